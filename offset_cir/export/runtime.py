"""The encoders the search index and the service run on: torch (``OFFSET``) or onnxruntime (``OnnxEncoder``).

``OnnxEncoder(folder)`` reads an export folder written by ``offset export`` (``offset_cir.export.onnx``) and offers
the part of the model's interface the index and the service use: ``encode_query(images, masks, texts)``,
``encode_target(images, masks)`` (torch tensors in and out, L2-normalised [B, D]), ``preprocess``, ``tokenize``,
``embed_dim``, ``config``, ``uses_masks`` / ``uses_query_mask`` / ``uses_target_mask``. Image preprocessing and
the tokenizer are the model's own (torchvision + the backbone's tokenizer); only the networks run in onnxruntime.

``load_encoder(checkpoint, runtime, onnx_dir=...)`` is the one place that picks the runtime; given a
``baseline`` (:class:`offset_cir.model.baseline.BaselineSpec`) it builds that training-free encoder instead (torch
only: a backbone's own features have no ONNX export). Features from either
runtime agree to ~1e-7 (far below the index's float16 storage step), so an index built with one is searched with
the other; what must match is the checkpoint, checked by its hash.
"""
from __future__ import annotations

import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from offset_cir.errors import CheckpointError, UserInputError
from offset_cir.hashing import is_tagged, tagged
from offset_cir.io import read_format_json

log = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnx")
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


def read_export(folder: str | os.PathLike) -> dict:
    """export.json of an export folder, checked: format, version and that the graph files are there."""
    from offset_cir.export.onnx import EXPORT_NAME, FORMAT, VERSION

    folder = Path(folder)
    path = folder / EXPORT_NAME
    if not path.is_file():
        raise UserInputError(f"{folder} is not an ONNX export (no {EXPORT_NAME}); make one with "
                             f"`offset export --checkpoint CKPT --out {folder}`")
    meta = read_format_json(path, FORMAT, VERSION, "export")
    for key in ("graphs", "embed_dim", "preprocess", "tokenizer", "model_config", "checkpoint"):
        if key not in meta:
            raise UserInputError(f"{path}: field {key!r} is missing")
    for role in ("query", "target"):
        g = meta["graphs"].get(role)
        if not isinstance(g, dict) or not (folder / str(g.get("file"))).is_file():
            raise UserInputError(f"{path}: graph {role!r} is missing (expected its file beside export.json)")
    return meta


def _as_numpy(x, dtype) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu()
        x = x.float() if dtype == np.float32 else x.long()
        return np.ascontiguousarray(x.numpy())
    return np.ascontiguousarray(np.asarray(x, dtype=dtype))


class OnnxEncoder:
    """OFFSET's query and target encoders on onnxruntime (CPU), read from an export folder.

    ``int8`` runs the int8 graphs (export with ``--int8``); ``threads`` is onnxruntime's intra-op thread count
    (None: onnxruntime's default, one per physical core); ``optimization`` its graph optimisation level.
    Sessions are created on first use (a server that only encodes queries never loads the target graph) and are
    safe to call from several threads.
    """

    runtime = "onnx"

    def __init__(self, folder: str | os.PathLike, *, int8: bool = False, threads: int | None = None,
                 optimization: str = "all", spinning: bool | None = None):
        from offset_cir.model.config import ModelConfig
        from offset_cir.model.towers import make_tokenizer
        from offset_cir.model.preprocess import Preprocess

        if optimization not in OPTIMIZATION_LEVELS:
            raise UserInputError(f"optimization must be one of {OPTIMIZATION_LEVELS}, got {optimization!r}")
        self.folder = Path(folder).resolve()
        self.meta = meta = read_export(self.folder)
        self.int8 = bool(int8)
        if self.int8:
            missing = [r for r in ("query", "target") if not meta["graphs"][r].get("int8_file")
                       or not (self.folder / meta["graphs"][r]["int8_file"]).is_file()]
            if missing:
                raise UserInputError(f"{self.folder}: no int8 graphs ({', '.join(missing)}); export with --int8")
        self.threads, self.optimization, self.spinning = threads, optimization, spinning
        self.config = ModelConfig.from_dict(meta["model_config"])
        self.embed_dim = int(meta["embed_dim"])
        pre = meta["preprocess"]
        self.preprocess = Preprocess(int(pre["image_size"]), pre["mean"], pre["std"])
        self.context_length = int(meta["tokenizer"]["context_length"])
        self.tokenizer = make_tokenizer(self.config.backbone, self.context_length)
        self._check_tokenizer()
        self.checkpoint_hash = meta["checkpoint"].get("hash")
        self.input_names = {r: [i["name"] for i in meta["graphs"][r]["inputs"]] for r in ("query", "target")}
        self._sessions: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._keep: Any = None  # a temporary export folder that must live as long as this encoder

    def _check_tokenizer(self) -> None:
        """The rebuilt tokenizer must give the token ids export.json recorded for its example text."""
        example = self.meta["tokenizer"].get("example") or {}
        if "text" not in example:
            return
        try:
            got = self.tokenize([example["text"]])[0].tolist()
        except UserInputError as exc:  # a tokenizer that is not available offline
            log.warning("%s: tokenizer unavailable (%s); only token id tensors can be encoded", self.folder, exc)
            return
        if got != list(example.get("tokens", [])):
            raise UserInputError(
                f"{self.folder / 'export.json'}: this installation tokenizes {example['text']!r} as {got[:12]}..., the "
                f"export recorded {list(example.get('tokens', []))[:12]}...: the tokenizer of backbone "
                f"{self.config.backbone!r} differs from the one the model was exported with")

    # -- what the index and the service ask of a model
    @property
    def uses_masks(self) -> bool:
        if "uses_masks" in self.meta:
            return bool(self.meta["uses_masks"])
        return bool(self.meta.get("needs_masks", True))  # the key an older export.json uses for "uses_masks"

    @property
    def uses_query_mask(self) -> bool:
        return "masks" in self.input_names["query"]

    @property
    def uses_target_mask(self) -> bool:
        return "masks" in self.input_names["target"]

    @property
    def runtime_info(self) -> dict:
        g = self.meta["graphs"]
        key = "int8_sha256" if self.int8 else "sha256"
        return {"runtime": "onnx", "int8": self.int8, "exporter": self.meta.get("exporter"),
                "query_graph": g["query"].get(key), "target_graph": g["target"].get(key)}

    def to(self, device=None, *args, **kwargs) -> "OnnxEncoder":
        if device is not None and str(device) != "cpu":
            log.info("onnxruntime runs on the CPU here (device %s is not used by --runtime onnx)", device)
        return self

    def eval(self) -> "OnnxEncoder":
        return self

    def parameters(self):
        return iter(())

    def state_dict(self) -> dict:
        return {}

    # -- sessions
    def _session_options(self):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.optimization]
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.inter_op_num_threads = 1
        if self.threads:
            opts.intra_op_num_threads = int(self.threads)
        if self.spinning is not None:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        opts.log_severity_level = 3
        return opts

    def session(self, role: str):
        """The onnxruntime session of ``role`` ("query" or "target"), created on first use."""
        sess = self._sessions.get(role)
        if sess is not None:
            return sess
        import onnxruntime as ort

        with self._lock:
            if role not in self._sessions:
                g = self.meta["graphs"][role]
                path = self.folder / (g["int8_file"] if self.int8 else g["file"])
                log.info("onnxruntime: loading %s", path)
                self._sessions[role] = ort.InferenceSession(str(path), self._session_options(),
                                                            providers=["CPUExecutionProvider"])
            return self._sessions[role]

    # -- encoding
    def tokenize(self, texts: Sequence[str] | str):
        if isinstance(texts, str):
            texts = [texts]
        return self.tokenizer(list(texts))

    def _run(self, role: str, feed: dict[str, np.ndarray]):
        import torch

        out = self.session(role).run(None, {n: feed[n] for n in self.input_names[role]})[0]
        return torch.from_numpy(np.ascontiguousarray(out))

    def _feed(self, role: str, images, masks) -> dict[str, np.ndarray]:
        feed = {"images": _as_numpy(images, np.float32)}
        if "masks" in self.input_names[role]:
            if masks is None:
                what = "reference" if role == "query" else "target"
                raise ValueError(f"{what} masks are required by this model configuration (use_masks=True); "
                                 "pass the dominant-portion masks or use the 'wo_fm' ablation")
            feed["masks"] = _as_numpy(masks, np.float32)
        return feed

    def encode_query(self, images, masks, texts):
        """Composed query features [B, D] (a torch tensor), as ``OFFSET.encode_query``."""
        feed = self._feed("query", images, masks)
        tokens = texts if hasattr(texts, "shape") else self.tokenize(texts)
        feed["tokens"] = _as_numpy(tokens, np.int64)
        return self._run("query", feed)

    def encode_target(self, images, masks=None):
        """Target features [B, D] (a torch tensor), as ``OFFSET.encode_target``."""
        return self._run("target", self._feed("target", images, masks))

    def __repr__(self) -> str:
        return f"OnnxEncoder({str(self.folder)!r}, int8={self.int8}, threads={self.threads})"


def _baseline_encoder(spec, runtime: str, checkpoint, onnx_dir, int8: bool, device):
    """The :class:`~offset_cir.model.baseline.BaselineEncoder` of ``spec`` on ``device`` (torch only)."""
    if runtime != "torch" or onnx_dir is not None or int8:
        raise UserInputError("a training-free baseline runs on the torch runtime only (a backbone's own features "
                             "have no ONNX export): --runtime onnx, --onnx and --int8 do not apply to it")
    if checkpoint is not None:
        raise UserInputError(f"a baseline names its backbone itself ({spec.describe()}); give no checkpoint besides")
    from offset_cir.device import choose_device

    return spec.build().to(choose_device(device, what="--device"))


def load_encoder(checkpoint=None, runtime: str = "torch", *, onnx_dir=None, expected_hash: str | None = None,
                 int8: bool = False, threads: int | None = None, device=None, baseline=None):
    """The model to encode with: ``OFFSET`` from ``checkpoint`` (runtime "torch", on ``device``: the rule of
    ``offset_cir.device.choose_device``) or an :class:`OnnxEncoder` (the CPU); with ``baseline`` (a
    :class:`~offset_cir.model.baseline.BaselineSpec`, no ``checkpoint`` then) its training-free encoder, torch only.
    Its precision is chosen next, by ``offset_cir.export.precision.use_precision``.

    For "onnx", ``onnx_dir`` is an export folder; without one ``checkpoint`` is exported into a temporary folder
    first. ``expected_hash`` (an index's checkpoint hash) must equal the export's (and the checkpoint's, when one
    is given): features of another model must never be searched together.
    """
    if runtime not in RUNTIMES:
        raise UserInputError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if baseline is not None:
        return _baseline_encoder(baseline, runtime, checkpoint, onnx_dir, int8, device)
    if runtime == "torch":
        import offset_cir

        if checkpoint is None:
            raise CheckpointError("the torch runtime needs a checkpoint (--checkpoint)")
        if int8:
            raise UserInputError("int8 is an onnxruntime option (use --runtime onnx)")
        from offset_cir.device import choose_device

        return offset_cir.load_checkpoint(checkpoint).to(choose_device(device, what="--device"))
    if onnx_dir is None:
        from offset_cir.export.onnx import export_checkpoint

        if checkpoint is None:
            raise CheckpointError("the onnx runtime needs an export folder (--onnx DIR) or a checkpoint to export")
        tmp = tempfile.TemporaryDirectory(prefix="offset-onnx-")
        log.info("no --onnx folder given: exporting %s to a temporary folder (use `offset export` to keep one)",
                 checkpoint)
        export_checkpoint(checkpoint, Path(tmp.name) / "export", int8=int8)
        encoder = OnnxEncoder(Path(tmp.name) / "export", int8=int8, threads=threads)
        encoder._keep = tmp
    else:
        encoder = OnnxEncoder(onnx_dir, int8=int8, threads=threads)
        if checkpoint is not None:  # any checkpoint named (a folder, a file, hf-hub:) must be the export's source
            from offset_cir.model.checkpoint import checkpoint_hash, require_same_checkpoint

            require_same_checkpoint(tagged(checkpoint_hash(checkpoint)), str(encoder.checkpoint_hash),
                                    found_in=f"checkpoint {checkpoint}", recorded_in=f"ONNX export {encoder.folder}",
                                    why="an export is used only with the checkpoint it was made from")
    if is_tagged(expected_hash):
        from offset_cir.model.checkpoint import require_same_checkpoint

        require_same_checkpoint(str(encoder.checkpoint_hash), expected_hash,
                                found_in=f"the checkpoint of ONNX export {encoder.folder}", recorded_in="the index")
    return encoder
