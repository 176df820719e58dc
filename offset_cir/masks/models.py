"""Captioner and segmenter back-ends for dominant portion segmentation (docs/model.md#masks).

Two small interfaces; anything with the same methods can be handed to :class:`~offset_cir.masks.MaskGenerator`:

* captioner: ``caption(images: list[PIL.Image]) -> list[str]``
* segmenter: attribute ``input_size`` = (height, width) it wants, and
  ``segment(images: list[PIL.Image at input_size], prompts: list[str]) -> float32 array [B, height, width]``
  of foreground probabilities in [0, 1].

The ``transformers`` implementations load by hub name or local folder.  Offline (``HF_HUB_OFFLINE`` set, or the
hub unreachable within two seconds) they only look in the local cache and fail at once with an
:class:`~offset_cir.errors.OfflineError` naming the ``--captioner DIR`` / ``--segmenter DIR`` option.
``transformers`` is imported only when a model is built.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

from offset_cir.errors import OfflineError, UserInputError
from offset_cir.extras import import_extra
from offset_cir.hub import env_flag, hub_reachable

logger = logging.getLogger(__name__)

DEFAULT_CAPTIONER = "Salesforce/blip2-opt-2.7b"
DEFAULT_SEGMENTER = "CIDAS/clipseg-rd64-refined"


@runtime_checkable
class Captioner(Protocol):
    def caption(self, images: Sequence[Any]) -> list[str]: ...


@runtime_checkable
class Segmenter(Protocol):
    input_size: tuple[int, int]

    def segment(self, images: Sequence[Any], prompts: Sequence[str]) -> Any: ...


# --------------------------------------------------------------------------------------------- device and dtype
def resolve_device(device: str | None) -> str:
    """The device for ``--device`` as a string (``"cpu"``, ``"cuda:0"`` ...), by the package's one rule
    (:func:`offset_cir.device.choose_device`: ``auto``/None -> this process's GPU when CUDA is available, else the
    CPU; CUDA asked for without it, or no device at all, is a UserInputError naming ``--device``)."""
    from offset_cir.device import choose_device

    return str(choose_device(device, what="--device"))


def resolve_dtype(dtype: str | None, device: str):
    """``auto`` -> bfloat16 on a GPU that supports it, float16 on other GPUs, float32 on CPU."""
    import torch

    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype in (None, "", "auto"):
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in names:
        raise UserInputError(f"--dtype {dtype}: expected one of auto, {', '.join(sorted(names))}")
    return names[dtype]


# --------------------------------------------------------------------------------------------- hub / folder
def resolve_source(name_or_dir: str, option: str) -> tuple[str, bool]:
    """Return (what to pass to ``from_pretrained``, local_files_only).

    An existing folder is used as is.  A hub name is looked up in the local cache only when offline.
    """
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return str(path), True
    if path.exists() or str(name_or_dir).startswith((".", "/", "~")) or str(name_or_dir).count("/") > 1:
        raise UserInputError(f"{option} {name_or_dir}: not a folder (expected a model folder saved with "
                             f"save_pretrained, or a hub name such as {DEFAULT_CAPTIONER})")
    offline = env_flag("TRANSFORMERS_OFFLINE") or not hub_reachable(timeout=2.0)  # HF_HUB_OFFLINE: in the probe
    return str(name_or_dir), offline


def _load_error(role: str, option: str, keyword: str, name: str, local_only: bool, exc: BaseException) -> UserInputError:
    if local_only and not Path(name).expanduser().is_dir():
        return OfflineError(
            f"{role} '{name}' is not a local folder and not in the Hugging Face cache, and the hub cannot be "
            f"reached (offline). On a connected machine run `hf download {name} --local-dir DIR`, copy DIR here, "
            f"and pass it with `offset masks {option} DIR` (Python: MaskGenerator({keyword}=DIR))."
        )
    return UserInputError(f"{option} {name}: cannot load the {role} ({type(exc).__name__}: {exc})")


def _import_transformers():
    return import_extra("transformers", "segment", "mask generation")


def _move(inputs, device: str, dtype) -> dict:
    """Batch to device; floating tensors (pixel values) to the model's dtype."""
    out = {}
    for key, value in inputs.items():
        if hasattr(value, "to"):
            value = value.to(device)
            if value.is_floating_point():
                value = value.to(dtype)
        out[key] = value
    return out


# --------------------------------------------------------------------------------------------- captioner
class HFCaptioner:
    """Any ``transformers`` image-to-text model (BLIP-2 by default, BLIP, ...) by hub name or folder."""

    def __init__(self, name_or_dir: str = DEFAULT_CAPTIONER, device: str = "cpu", dtype: str | None = "auto",
                 max_new_tokens: int = 30):
        transformers = _import_transformers()
        import torch

        self.name = str(name_or_dir)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_new_tokens = int(max_new_tokens)
        source, local_only = resolve_source(self.name, "--captioner")
        try:
            self.processor = transformers.AutoProcessor.from_pretrained(source, local_files_only=local_only)
            model_cls = getattr(transformers, "AutoModelForImageTextToText")
            try:
                model = model_cls.from_pretrained(source, local_files_only=local_only, dtype=self.dtype)
            except ValueError:
                model_cls = getattr(transformers, "AutoModelForVision2Seq", None)
                if model_cls is None:
                    raise
                model = model_cls.from_pretrained(source, local_files_only=local_only, dtype=self.dtype)
        except (OSError, ValueError, KeyError) as exc:
            raise _load_error("captioner", "--captioner", "captioner", self.name, local_only, exc) from exc
        self.model = model.to(self.device).eval()
        self._torch = torch
        logger.info("captioner %s on %s (%s)", self.name, self.device, self.dtype)

    def caption(self, images):
        with self._torch.inference_mode():
            inputs = _move(self.processor(images=list(images), return_tensors="pt"), self.device, self.dtype)
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return [" ".join(text.split()) for text in self.processor.batch_decode(ids, skip_special_tokens=True)]


# --------------------------------------------------------------------------------------------- segmenter
class CLIPSegSegmenter:
    """CLIPSeg (``CIDAS/clipseg-rd64-refined`` by default) by hub name or folder; input size from its processor."""

    def __init__(self, name_or_dir: str = DEFAULT_SEGMENTER, device: str = "cpu", dtype: str | None = "auto"):
        transformers = _import_transformers()
        import torch

        self.name = str(name_or_dir)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        source, local_only = resolve_source(self.name, "--segmenter")
        try:
            self.processor = transformers.AutoProcessor.from_pretrained(source, local_files_only=local_only)
            model = transformers.CLIPSegForImageSegmentation.from_pretrained(
                source, local_files_only=local_only, dtype=self.dtype)
        except (OSError, ValueError, KeyError) as exc:
            raise _load_error("segmenter", "--segmenter", "segmenter", self.name, local_only, exc) from exc
        self.model = model.to(self.device).eval()
        size = self.processor.image_processor.size
        height = getattr(size, "height", None) or (size.get("height") if isinstance(size, dict) else None)
        width = getattr(size, "width", None) or (size.get("width") if isinstance(size, dict) else None)
        if not height or not width:
            side = model.config.vision_config.image_size
            height = width = side if isinstance(side, int) else side[0]
        self.input_size = (int(height), int(width))
        self.max_text_length = int(model.config.text_config.max_position_embeddings)
        self._torch = torch
        logger.info("segmenter %s on %s (%s), input %dx%d", self.name, self.device, self.dtype, width, height)

    def segment(self, images, prompts):
        torch = self._torch
        with torch.inference_mode():
            inputs = self.processor(text=list(prompts), images=list(images), padding=True, truncation=True,
                                    max_length=self.max_text_length, return_tensors="pt")
            logits = self.model(**_move(inputs, self.device, self.dtype)).logits.float()
            if logits.dim() == 2:  # some versions squeeze a batch of one
                logits = logits.unsqueeze(0)
            if tuple(logits.shape[-2:]) != self.input_size:
                logits = torch.nn.functional.interpolate(logits[:, None], size=self.input_size, mode="bilinear",
                                                         align_corners=False)[:, 0]
            return torch.sigmoid(logits).cpu().numpy()
