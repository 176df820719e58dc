"""The precision a torch encoder runs in: fp32, bf16, or ``auto`` (bf16 only where it is measured faster on this
machine for this model and its features agree with fp32's).

``use_precision(model, precision)`` is the one place that decides: it returns ``model`` itself for fp32, or a
:class:`Bf16Encoder` (a bfloat16 copy of the model behind the same ``encode_query`` / ``encode_target``
interface, taking and giving float32) for bf16, with the choice. ``auto`` runs :func:`calibrate` once per model and process: a
short timing of one query and one target encoding in each precision on a synthetic batch, and the cosine of the
bf16 features with the fp32 ones. The choice (what runs, why, the timings and the cosine) is a
:class:`PrecisionChoice`, logged and shown by ``/health``.

bf16 keeps float32's exponent range with 8 significant bits: every rounded result carries a relative error up to
u = 2^-8. The whole model is cast rather than run under autocast: under CPU autocast the attention of OpenCLIP's
ViTs leaves PyTorch's fused path and copies its projection weights once per token, slower than fp32.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import time
import weakref
from typing import Callable

import numpy as np

from offset_cir.errors import UserInputError

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "auto")
#: bf16 is chosen by ``auto`` only when every calibration row's bf16 feature has at least this cosine with fp32's
MIN_COSINE = 0.999
#: ... and one calibration pass runs at least this many times faster in bf16 (margin over timing noise)
MIN_SPEEDUP = 1.15
#: timed passes per precision (after one warm-up pass); the fastest counts
CALIBRATION_REPEATS = 2
#: synthetic queries (and targets) per calibration pass
CALIBRATION_BATCH = 1

_choices: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> (device, PrecisionChoice)


@dataclasses.dataclass(frozen=True)
class PrecisionChoice:
    """Which precision an encoder runs in and why."""

    #: what runs: "fp32" or "bf16"
    precision: str
    #: what was asked: "fp32", "bf16" or "auto"
    requested: str
    #: why, in words
    reason: str
    #: seconds of one calibration pass (a query and a target encoding) in fp32 and in bf16; None: not measured
    fp32_seconds: float | None = None
    bf16_seconds: float | None = None
    #: the lowest cosine between a calibration row's bf16 and fp32 features; None: not measured
    cosine: float | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One line for a log or a terminal."""
        text = f"precision {self.precision} ({self.requested}: {self.reason})"
        if self.cosine is not None:
            text += (f"; calibration: fp32 {self.fp32_seconds * 1e3:.0f} ms, bf16 {self.bf16_seconds * 1e3:.0f} ms, "
                     f"cosine of bf16 with fp32 features >= {self.cosine:.6f}")
        return text


class Bf16Encoder:
    """A bfloat16 copy of a torch model behind its encode interface: ``encode_query`` / ``encode_target`` take
    float32 images and masks and return float32 L2-normalised features; every other attribute is the model's
    (``preprocess``, ``embed_dim``, ``config``, ``uses_masks`` ...). ``precision`` is the :class:`PrecisionChoice`."""

    runtime = "torch"

    def __init__(self, model, choice: PrecisionChoice):
        import torch

        self.model = copy.deepcopy(model).to(torch.bfloat16)
        self.precision = choice

    def __getattr__(self, name):
        if name == "model":  # not set yet (copying, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)

    @property
    def runtime_info(self) -> dict:
        return {"runtime": "torch", "precision": "bf16"}

    def _cast(self, x):
        import torch

        return None if x is None else x.to(torch.bfloat16)

    def _out(self, features):
        import torch.nn.functional as F

        return F.normalize(features.float(), dim=-1)  # rounding the last step to bf16 moved the norm off 1

    def encode_query(self, images, masks, texts):
        return self._out(self.model.encode_query(self._cast(images), self._cast(masks), texts))

    def encode_target(self, images, masks=None):
        return self._out(self.model.encode_target(self._cast(images), self._cast(masks)))

    def to(self, *args, **kwargs) -> "Bf16Encoder":
        """Move the model (its dtype stays bfloat16)."""
        import torch

        self.model.to(*args, **kwargs).to(torch.bfloat16)
        return self

    def eval(self) -> "Bf16Encoder":
        self.model.eval()
        return self

    def train(self, mode: bool = True) -> "Bf16Encoder":
        self.model.train(mode)
        return self

    def __repr__(self) -> str:
        return f"Bf16Encoder({type(self.model).__name__})"


def _synthetic_batch(model, n: int, device):
    """``n`` synthetic references (random block images and square masks through the model's own preprocessing)
    and modification texts, on ``device``."""
    import torch
    from PIL import Image

    rng = np.random.default_rng(0)
    size = int(getattr(model.preprocess, "image_size", 224))
    images, masks = [], []
    for _ in range(n):
        blocks = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        pil = Image.fromarray(np.kron(blocks, np.ones((size // 4 or 1, size // 4 or 1, 1), dtype=np.uint8)))
        m = np.zeros(pil.size[::-1], dtype=np.uint8)
        m[: m.shape[0] // 2, m.shape[1] // 4:] = 255
        images.append(model.preprocess.image(pil, train=False))
        masks.append(model.preprocess.mask(Image.fromarray(m, "L"), train=False))
    texts = ["make it red with thin white stripes", "same but larger and on the left"] * n
    return torch.stack(images).to(device), torch.stack(masks).to(device), texts[:n]


def encode_seconds(encode: Callable[[], object], repeats: int = CALIBRATION_REPEATS) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``encode`` (warm it up first: first calls allocate and pick
    kernels)."""
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        encode()
        best = min(best, time.perf_counter() - t0)
    return best


def calibrate(model, *, batch: int = CALIBRATION_BATCH, repeats: int = CALIBRATION_REPEATS,
              min_cosine: float = MIN_COSINE, min_speedup: float = MIN_SPEEDUP) -> PrecisionChoice:
    """Time one pass (``batch`` queries and targets) in fp32 and in bf16 and compare the features: bf16 when it is
    ``min_speedup`` times faster and every row's cosine with fp32 is at least ``min_cosine``, else fp32."""
    return _calibrated(model, batch, repeats, min_cosine, min_speedup)[0]


def _calibrated(model, batch: int = CALIBRATION_BATCH, repeats: int = CALIBRATION_REPEATS,
                min_cosine: float = MIN_COSINE, min_speedup: float = MIN_SPEEDUP):
    """:func:`calibrate`'s choice and the :class:`Bf16Encoder` it timed."""
    import torch
    import torch.nn.functional as F

    from offset_cir.device import device_of

    images, masks, texts = _synthetic_batch(model, batch, device_of(model))
    q_masks = masks if getattr(model, "uses_query_mask", True) else None
    t_masks = masks if getattr(model, "uses_target_mask", True) else None
    low = Bf16Encoder(model, PrecisionChoice("bf16", "auto", "calibrating"))

    def pass_of(encoder):
        def run():
            with torch.inference_mode():
                return torch.cat([encoder.encode_query(images, q_masks, texts).float(),
                                  encoder.encode_target(images, t_masks).float()])
        return run

    high_pass, low_pass = pass_of(model), pass_of(low)
    was_training = bool(getattr(model, "training", False))
    model.eval()  # inference as it will run (dropout off), whatever mode the model came in
    low.eval()
    try:
        high, fp32_s = high_pass(), encode_seconds(high_pass, repeats)  # the first pass is also the warm-up
        bf16, bf16_s = low_pass(), encode_seconds(low_pass, repeats)
    finally:
        model.train(was_training)
        low.train(was_training)
    cosine = float(F.cosine_similarity(high, bf16, dim=-1).min())
    measured = dict(fp32_seconds=fp32_s, bf16_seconds=bf16_s, cosine=cosine)
    if not np.isfinite(cosine) or cosine < min_cosine:
        choice = PrecisionChoice("fp32", "auto", f"bf16 features disagree with fp32 (cosine {cosine:.6f} < "
                                                 f"{min_cosine:g})", **measured)
    elif bf16_s * min_speedup > fp32_s:
        choice = PrecisionChoice("fp32", "auto", f"bf16 is not {min_speedup:g}x faster here", **measured)
    else:
        choice = PrecisionChoice("bf16", "auto", f"bf16 is {fp32_s / bf16_s:.2f}x faster here and agrees with "
                                                 f"fp32", **measured)
    low.precision = choice
    return choice, low


def use_precision(model, precision: str = "fp32"):
    """``(encoder, choice)``: ``model`` ready to encode in ``precision`` ("fp32", "bf16" or "auto") -- the model
    itself or a :class:`Bf16Encoder` -- and the :class:`PrecisionChoice`. ``auto`` calibrates once per model and
    process (:func:`calibrate`). onnxruntime encoders run their exported graphs: fp32 (or ``auto``) only."""
    if precision not in PRECISIONS:
        raise UserInputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if isinstance(model, Bf16Encoder):
        raise UserInputError("this encoder already runs in bf16; give use_precision the model it was made from")
    if getattr(model, "runtime", "torch") != "torch" or not hasattr(model, "parameters"):
        if precision == "bf16":
            raise UserInputError("--precision bf16 runs the torch model; onnxruntime runs the exported float32 "
                                 "graphs (use --runtime torch, or --precision fp32)")
        return model, PrecisionChoice("fp32", precision, "onnxruntime runs the exported float32 graphs")
    if precision == "fp32":
        return model, PrecisionChoice("fp32", "fp32", "asked for")
    if precision == "bf16":
        choice, low = PrecisionChoice("bf16", "bf16", "asked for"), None
    else:
        choice, low = _auto_choice(model)
    log.info("%s", choice.describe())
    if choice.precision == "fp32":
        return model, choice
    return (low if low is not None else Bf16Encoder(model, choice)), choice


def _auto_choice(model):
    """``auto``'s choice for ``model`` on its device, calibrated once per process: (choice, the bf16 encoder the
    calibration made, None when the choice was known)."""
    from offset_cir.device import device_of

    device = device_of(model)
    known = _choices.get(model)
    if known is not None and known[0] == device:
        return known[1], None
    log.info("precision auto: timing one query and one target encoding in fp32 and in bf16 ...")
    choice, low = _calibrated(model)
    _choices[model] = (device, choice)
    return choice, low
