"""Export a trained OFFSET model to two ONNX graphs and a description of how to feed them.

An export folder holds::

    query.onnx        images [B,3,S,S] float32, masks [B,3,S,S] float32, tokens [B,L] int64 -> features [B,D]
    target.onnx       images [B,3,S,S] float32, masks [B,3,S,S] float32 -> features [B,D]
    query.int8.onnx   (with int8=True) the same graphs with onnxruntime dynamic int8 quantisation
    target.int8.onnx
    export.json       inputs and shapes, preprocessing (size, mean, std, interpolation), tokenizer and context
                      length, checkpoint hash, the torch-vs-onnxruntime check, versions

Features are L2-normalised, exactly what ``OFFSET.encode_query`` / ``encode_target`` return. A graph has a
``masks`` input only when its side of the model uses masks (none for the "w/o FM" ablation; no target mask for
"w/o Target_VFM"). The batch dimension is dynamic; S (the image size) and L (the context length) are fixed by the
backbone.

Exporter: the TorchScript (tracing) exporter by default, ``exporter="dynamo"`` for the ``torch.export`` one. Both
agree with torch to ~1e-7 on these graphs; the TorchScript one exports faster and its graphs run faster under
onnxruntime (docs/deploy.md gives the measurements; benchmarks/onnx_speed.py takes them).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from offset_cir import io
from offset_cir.errors import ExportError, UserInputError
from offset_cir.hashing import file_sha256, tagged
from offset_cir.stamps import environment

log = logging.getLogger(__name__)

FORMAT = "offset-cir-onnx"
VERSION = 1
EXPORT_NAME = "export.json"
GRAPH_FILES = {"query": "query.onnx", "target": "target.onnx"}
INT8_FILES = {"query": "query.int8.onnx", "target": "target.int8.onnx"}
EXPORTERS = ("torchscript", "dynamo")
DEFAULT_EXPORTER = "torchscript"
OPSET = 18
#: max |onnxruntime - torch| allowed on the L2-normalised features (unit vectors: float32 rounding over a deep
#: network stays around 1e-7..1e-6; 1e-4 leaves two orders of magnitude for other CPUs and kernels)
TOLERANCE = 1e-4
OUTPUT_NAME = "features"
SAMPLE_TEXTS = ("a photo of a red dress", "make it longer, with blue stripes and no sleeves", "the same but dark")


class _QueryGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, masks, tokens):
        return self.model.encode_query(images, masks, tokens)


class _QueryGraphNoMask(_QueryGraph):
    def forward(self, images, tokens):
        return self.model.encode_query(images, None, tokens)


class _TargetGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, masks):
        return self.model.encode_target(images, masks)


class _TargetGraphNoMask(_TargetGraph):
    def forward(self, images):
        return self.model.encode_target(images, None)


def _query_uses_masks(model) -> bool:
    return bool(model.uses_masks) and bool(getattr(model, "uses_query_mask", True))


def _target_uses_masks(model) -> bool:
    return bool(model.uses_masks) and bool(getattr(model, "uses_target_mask", True))


def graph_inputs(model) -> dict[str, list[str]]:
    """Input names of the two graphs: ``masks`` only where that side of the model uses masks."""
    q = ["images"] + (["masks"] if _query_uses_masks(model) else []) + ["tokens"]
    t = ["images"] + (["masks"] if _target_uses_masks(model) else [])
    return {"query": q, "target": t}


@dataclasses.dataclass
class ExportReport:
    """What ``export_onnx`` wrote: the folder, its files, the agreement with torch, and export.json's content."""

    path: Path
    files: dict[str, str]
    max_abs_diff: dict[str, float]
    int8_max_abs_diff: dict[str, float] | None
    meta: dict


def _sha256(path: Path) -> str:
    return tagged(file_sha256(path))


def _example_inputs(model, batch: int, seed: int) -> dict[str, torch.Tensor]:
    """Random images and masks (standard normal, the range of normalised pixels) and real token ids."""
    g = torch.Generator().manual_seed(seed)
    s = int(model.preprocess.image_size)
    texts = [SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)] + (" again" * (i // len(SAMPLE_TEXTS))) for i in range(batch)]
    return {
        "images": torch.randn(batch, 3, s, s, generator=g),
        "masks": torch.randn(batch, 3, s, s, generator=g),
        "tokens": model.tokenize(texts).cpu().to(torch.int64),
    }


def _torch_features(model, role: str, inputs: dict[str, torch.Tensor], names: list[str]) -> np.ndarray:
    with torch.inference_mode():
        masks = inputs["masks"] if "masks" in names else None
        if role == "query":
            out = model.encode_query(inputs["images"], masks, inputs["tokens"])
        else:
            out = model.encode_target(inputs["images"], masks)
    return out.float().numpy()


def _export_graph(module: nn.Module, args: tuple, names: list[str], path: Path, exporter: str, opset: int) -> None:
    if exporter == "dynamo":
        batch = torch.export.Dim("batch", min=1, max=4096)
        with warnings.catch_warnings():  # one batch Dim shared by every input, as intended
            warnings.filterwarnings("ignore", message=".*shares the same shape constraints.*")
            program = torch.onnx.export(module, args, dynamo=True, input_names=names, output_names=[OUTPUT_NAME],
                                        dynamic_shapes={n: {0: batch} for n in names}, opset_version=opset,
                                        verbose=False)
        program.save(str(path), external_data=False)
        return
    # The TorchScript exporter traces the model. nn.MultiheadAttention's inference fast path is one fused
    # operator ONNX has no translation for: trace the plain composition instead (same maths; restored after).
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks traced as constants: S, L fixed
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*advanced indexing.*")  # EOT gather: indices are >= 0
            torch.onnx.export(module, args, str(path), dynamo=False, input_names=names,
                              output_names=[OUTPUT_NAME], opset_version=opset, do_constant_folding=True,
                              dynamic_axes={n: {0: "batch"} for n in [*names, OUTPUT_NAME]})
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _ort_run(path: Path, inputs: dict[str, torch.Tensor], names: list[str]) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    got = [i.name for i in sess.get_inputs()]
    if got != names:
        raise RuntimeError(f"{path.name}: the exported graph has inputs {got}, expected {names}")
    return sess.run(None, {n: inputs[n].numpy() for n in names})[0]


def _quantize_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)


def _is_export_file(name: str) -> bool:
    return name == EXPORT_NAME or (name.endswith(".onnx") and name.startswith(("query", "target")))


def check_out(out: str | os.PathLike, overwrite: bool) -> Path:
    """``out`` as an absolute path, or a UserInputError when it is a file or a non-empty folder (not overwrite).
    ``overwrite`` replaces an earlier export only: a folder holding anything else is refused even then."""
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserInputError(f"--out {out} exists and is not empty; choose another folder or pass --overwrite "
                                 f"to replace the export in it")
        foreign = sorted(p.name for p in out.iterdir() if not _is_export_file(p.name))
        if foreign:
            raise UserInputError(f"--out {out} holds files that are not an export ({', '.join(foreign[:5])}"
                                 f"{', ...' if len(foreign) > 5 else ''}): --overwrite replaces an earlier export "
                                 "only; choose an empty folder")
    return out


def _prepare_out(out: Path, overwrite: bool) -> Path:
    """Check ``out`` may be written; returns a fresh staging folder beside it (moved into place at the end)."""
    out = check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.export-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    return staging


def _commit(staging: Path, out: Path) -> None:
    """Replace ``out`` by ``staging``; the old content is removed only once the new one is in place."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _preprocess_meta(model) -> dict[str, Any]:
    pre = model.preprocess
    return {
        "image_size": int(pre.image_size),
        "mean": [float(x) for x in pre.mean],
        "std": [float(x) for x in pre.std],
        "interpolation": "bicubic",
        "resize": "shortest side to image_size (PIL bicubic), then centre crop image_size x image_size",
        "to_tensor": "RGB, channels first, values / 255 in [0, 1], then (x - mean) / std per channel",
        "mask": "grayscale (white = the part that matters) converted to 3-channel RGB, then exactly as an image",
        "layout": "NCHW float32",
    }


def _tokenizer_meta(model) -> dict[str, Any]:
    tok = model.tokenizer
    example = SAMPLE_TEXTS[0]
    ids = model.tokenize([example])[0].tolist()
    return {
        "class": f"{type(tok).__module__}.{type(tok).__qualname__}",
        "backbone": model.config.backbone,
        "context_length": int(len(ids)),
        "dtype": "int64",
        "example": {"text": example, "tokens": ids},
        "note": "offset_cir.export.OnnxEncoder rebuilds this tokenizer from the backbone name",
    }


def export_onnx(model, out: str | os.PathLike, *, checkpoint: str | os.PathLike | None = None,
                checkpoint_hash: str | None = None, int8: bool = False, overwrite: bool = False,
                exporter: str = DEFAULT_EXPORTER, opset: int = OPSET, seed: int = 0) -> ExportReport:
    """Export ``model`` (an OFFSET) into the folder ``out`` (see the module docstring); returns what was written.

    ``out`` must be absent or empty unless ``overwrite``; the files are written beside it and moved into place at
    the end, so a failed export leaves ``out`` as it was. Each graph is checked against torch on random inputs
    of a batch size other than the one traced (so the dynamic batch is checked too). The model is moved to the
    CPU in float32 (in place, as ``nn.Module.to`` does); its train/eval mode is restored afterwards.
    """
    if exporter not in EXPORTERS:
        raise UserInputError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    out = Path(out).resolve()
    staging = _prepare_out(out, overwrite)
    was_training = model.training
    try:
        model = model.float().cpu().eval()
        names = graph_inputs(model)
        modules = {
            "query": (_QueryGraph if "masks" in names["query"] else _QueryGraphNoMask)(model).eval(),
            "target": (_TargetGraph if "masks" in names["target"] else _TargetGraphNoMask)(model).eval(),
        }
        trace_inputs = _example_inputs(model, 2, seed)
        check_inputs = _example_inputs(model, 3, seed + 1)
        diffs: dict[str, float] = {}
        int8_diffs: dict[str, float] | None = {} if int8 else None
        graphs: dict[str, Any] = {}
        files: dict[str, str] = {}
        s, length, d = int(model.preprocess.image_size), int(trace_inputs["tokens"].shape[1]), int(model.embed_dim)
        shapes = {"images": ["batch", 3, s, s], "masks": ["batch", 3, s, s], "tokens": ["batch", length],
                  OUTPUT_NAME: ["batch", d]}
        for role in ("query", "target"):
            graphs[role], diffs[role], q_diff = _export_role(
                model, modules[role], role, names[role], staging, trace_inputs, check_inputs,
                exporter=exporter, opset=opset, int8=int8, shapes=shapes)
            files[role] = str(out / GRAPH_FILES[role])
            if int8:
                int8_diffs[role] = q_diff
                files[role + "_int8"] = str(out / INT8_FILES[role])
        cfg = model.config
        meta = {
            "format": FORMAT, "version": VERSION, "exporter": exporter, "opset": opset,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "graphs": graphs, "embed_dim": d,
            # an older export.json may say needs_masks / query_needs_mask / target_needs_mask instead
            "uses_masks": bool(model.uses_masks), "uses_query_mask": "masks" in names["query"],
            "uses_target_mask": "masks" in names["target"],
            "preprocess": _preprocess_meta(model), "tokenizer": _tokenizer_meta(model),
            "model_config": cfg.to_dict(),
            "checkpoint": {"path": _checkpoint_path(checkpoint), "hash": checkpoint_hash},
            "check": {"inputs": f"random images and masks (standard normal), real tokens; batch 3, seed {seed + 1}",
                      "max_abs_diff": diffs, "int8_max_abs_diff": int8_diffs, "tolerance": TOLERANCE},
            "versions": environment("onnx", "onnxscript", "onnxruntime"),
        }
        io.write_text(staging / EXPORT_NAME, json.dumps(meta, indent=1) + "\n")
        files["export"] = str(out / EXPORT_NAME)
        _commit(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        model.train(was_training)
    log.info("exported to %s (max |onnxruntime - torch|: query %.2g, target %.2g)", out, diffs["query"],
             diffs["target"])
    return ExportReport(out, files, diffs, int8_diffs, meta)


def _export_role(model, module, role: str, names: list[str], staging: Path, trace_inputs: dict,
                 check_inputs: dict, *, exporter: str, opset: int, int8: bool, shapes: dict):
    """One graph (``role``: query or target) written into ``staging`` and checked against torch: its
    ``export.json`` entry, its largest difference from torch, and that of its int8 copy (None without one)."""
    path = staging / GRAPH_FILES[role]
    log.info("exporting the %s graph (%s exporter, inputs %s)", role, exporter, ", ".join(names))
    with torch.no_grad():
        _export_graph(module, tuple(trace_inputs[n] for n in names), names, path, exporter, opset)
    want = _torch_features(model, role, check_inputs, names)
    diff = float(np.abs(_ort_run(path, check_inputs, names) - want).max())
    if not diff <= TOLERANCE:  # a trace that baked in a batch size or a length, an unsupported op...
        raise ExportError(f"the exported {role} graph does not reproduce the model: onnxruntime differs from "
                          f"torch by {diff:.3g} (more than {TOLERANCE:.0e}) at batch "
                          f"{len(check_inputs['images'])}; nothing was written. Try --exporter "
                          f"{'dynamo' if exporter == 'torchscript' else 'torchscript'}, or report the backbone")
    entry = {
        "file": GRAPH_FILES[role], "sha256": _sha256(path),
        "inputs": [{"name": n, "shape": shapes[n], "dtype": "int64" if n == "tokens" else "float32"} for n in names],
        "output": {"name": OUTPUT_NAME, "shape": shapes[OUTPUT_NAME], "dtype": "float32", "l2_normalised": True},
        "int8_file": None,
    }
    if not int8:
        return entry, diff, None
    qpath = staging / INT8_FILES[role]
    log.info("quantising the %s graph to int8 (onnxruntime dynamic quantisation)", role)
    _quantize_int8(path, qpath)
    entry.update(int8_file=INT8_FILES[role], int8_sha256=_sha256(qpath))
    return entry, diff, float(np.abs(_ort_run(qpath, check_inputs, names) - want).max())


def _checkpoint_path(checkpoint) -> str | None:
    if checkpoint is None:
        return None
    if str(checkpoint).startswith("hf-hub:"):
        return str(checkpoint)
    return str(Path(checkpoint).resolve())


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, **kwargs) -> ExportReport:
    """Load ``checkpoint`` (a folder written by ``save_checkpoint``) and export it with :func:`export_onnx`;
    export.json records the checkpoint's ``sha256:`` hash (the one an index built from it records)."""
    from offset_cir.model.checkpoint import checkpoint_hash, load_checkpoint

    check_out(out, kwargs.get("overwrite", False))  # before any work: a used folder or a wrong path fails here
    h = tagged(checkpoint_hash(checkpoint))
    model = load_checkpoint(checkpoint)
    return export_onnx(model, out, checkpoint=checkpoint, checkpoint_hash=h, **kwargs)
