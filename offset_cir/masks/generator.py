"""``MaskGenerator``: captioner + CLIPSeg -> one soft dominant-portion mask per image (docs/model.md#masks)."""
from __future__ import annotations

import logging
import string
from typing import Any, Sequence

import numpy as np

from offset_cir.errors import UserInputError
from offset_cir.masks.geometry import DEFAULT_FILL, check_geometry, from_segmenter, to_mask_image, to_segmenter
from offset_cir.masks.models import DEFAULT_CAPTIONER, DEFAULT_SEGMENTER

logger = logging.getLogger(__name__)

PROMPT_FIELDS = ("caption", "category", "stem")


def _template_fields(template: str) -> set[str]:
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    unknown = fields - set(PROMPT_FIELDS)
    if unknown:
        raise UserInputError(f"--prompt-template {template!r}: unknown field(s) {sorted(unknown)}; "
                             f"allowed: {{{'}, {'.join(PROMPT_FIELDS)}}}")
    return fields


class MaskGenerator:
    """Callable: ``gen(pil_images, captions=None) -> list[PIL.Image]`` (mode ``L``, each the size of its image).

    ``captioner`` / ``segmenter`` are a hub name or local folder (loaded with ``transformers`` on first use),
    an object with the interface of :mod:`offset_cir.masks.models`, or a zero-argument factory returning one
    (called on first use).  ``captioner=None`` means captions must be given (or ``fixed_prompt`` set).
    The segmenter prompt is ``fixed_prompt`` when set, else ``prompt_template`` (default ``"{caption}"``,
    fields ``{caption}``, ``{category}``, ``{stem}``) filled per image.  Nothing is loaded at construction.
    """

    def __init__(self, captioner: Any = DEFAULT_CAPTIONER, segmenter: Any = DEFAULT_SEGMENTER,
                 geometry: str = "letterbox", device: str = "cpu", batch_size: int = 8,
                 prompt_template: str | None = None, fixed_prompt: str | None = None, dtype: str | None = "auto",
                 max_new_tokens: int = 30, fill: tuple[int, int, int] = DEFAULT_FILL):
        self.geometry = check_geometry(geometry)
        if int(batch_size) < 1:
            raise UserInputError(f"--batch-size {batch_size}: expected a positive integer")
        self.batch_size = int(batch_size)
        self.device = device
        self.dtype = dtype
        self.max_new_tokens = max_new_tokens
        self.fill = tuple(fill)
        self.prompt_template = prompt_template or "{caption}"
        self.fixed_prompt = fixed_prompt
        self._fields = _template_fields(self.prompt_template) if fixed_prompt is None else set()
        self._captioner_spec, self._captioner = self._split(captioner, "caption")
        self._segmenter_spec, self._segmenter = self._split(segmenter, "segment")

    @staticmethod
    def _split(spec: Any, method: str):
        """(spec to build later, ready instance or None)."""
        if spec is not None and not isinstance(spec, (str, type)) and hasattr(spec, method):
            return None, spec
        return spec, None

    # ------------------------------------------------------------------ lazily built back-ends
    @property
    def needs_captions(self) -> bool:
        """Whether prompts use captions at all (False with a fixed prompt or a template without {caption})."""
        return "caption" in self._fields

    @property
    def captioner(self):
        """The captioner, built on first access (raises a clear error when none was configured)."""
        if self._captioner is None:
            spec = self._captioner_spec
            if spec is None:
                raise UserInputError("captions are missing and no captioner was given "
                                     "(pass --captions FILE with every image, --captioner, or --fixed-prompt)")
            self._captioner = self._build(spec, "captioner")
        return self._captioner

    @property
    def segmenter(self):
        if self._segmenter is None:
            if self._segmenter_spec is None:
                raise UserInputError("no segmenter was given")
            self._segmenter = self._build(self._segmenter_spec, "segmenter")
        return self._segmenter

    def _build(self, spec: Any, role: str):
        if isinstance(spec, str):
            from offset_cir.masks import models

            if role == "captioner":
                return models.HFCaptioner(spec, device=self.device, dtype=self.dtype,
                                          max_new_tokens=self.max_new_tokens)
            return models.CLIPSegSegmenter(spec, device=self.device, dtype=self.dtype)
        if callable(spec):
            return spec()
        raise UserInputError(f"{role}: expected a hub name, a folder, an object or a factory, got {type(spec).__name__}")

    # ------------------------------------------------------------------ steps
    def caption(self, images: Sequence[Any]) -> list[str]:
        """Captions for ``images`` from the captioner, in batches."""
        out: list[str] = []
        for start in range(0, len(images), self.batch_size):
            chunk = [im.convert("RGB") for im in images[start : start + self.batch_size]]
            texts = list(self.captioner.caption(chunk))
            if len(texts) != len(chunk):
                raise RuntimeError(f"captioner returned {len(texts)} captions for {len(chunk)} images")
            out.extend(texts)
        return out

    def prompts(self, captions: Sequence[str | None], categories: Sequence[str] | None = None,
                stems: Sequence[str] | None = None) -> list[str]:
        if self.fixed_prompt is not None:
            return [self.fixed_prompt] * len(captions)
        n = len(captions)
        categories = list(categories) if categories is not None else [""] * n
        stems = list(stems) if stems is not None else [""] * n
        return [self.prompt_template.format(caption=c or "", category=k, stem=s).strip()
                for c, k, s in zip(captions, categories, stems)]

    def segment(self, images: Sequence[Any], prompts: Sequence[str]) -> list[np.ndarray]:
        """Soft masks (float32 [H, W] in [0, 1], each at its image's size) for ``images`` and ``prompts``."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        segmenter = self.segmenter
        input_size = tuple(int(v) for v in segmenter.input_size)
        out: list[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            placed = [to_segmenter(im, input_size, self.geometry, self.fill)
                      for im in images[start : start + self.batch_size]]
            probs = np.asarray(segmenter.segment([p[0] for p in placed], list(prompts[start : start + len(placed)])))
            if probs.ndim != 3 or probs.shape[0] != len(placed):
                raise RuntimeError(f"segmenter returned shape {probs.shape} for {len(placed)} images")
            out.extend(from_segmenter(np.ascontiguousarray(prob), placement)
                       for prob, (_, placement) in zip(probs, placed))
        return out

    def generate(self, images: Sequence[Any], captions: Sequence[str | None] | None = None,
                 categories: Sequence[str] | None = None, stems: Sequence[str] | None = None,
                 ) -> tuple[list[Any], list[str | None]]:
        """(masks, captions used): missing captions (None) are filled in by the captioner when prompts need them."""
        images = list(images)
        captions = list(captions) if captions is not None else [None] * len(images)
        if len(captions) != len(images):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        if self.needs_captions:
            missing = [i for i, c in enumerate(captions) if c is None]
            if missing:
                for i, text in zip(missing, self.caption([images[i] for i in missing])):
                    captions[i] = text
        probs = self.segment(images, self.prompts(captions, categories, stems))
        return [to_mask_image(p) for p in probs], captions

    def __call__(self, pil_images: Sequence[Any], captions: Sequence[str | None] | None = None) -> list[Any]:
        return self.generate(pil_images, captions)[0]

    def load(self, captioner: bool | None = None) -> "MaskGenerator":
        """Build the back-ends now (fail fast); the captioner only when prompts need captions."""
        _ = self.segmenter
        if captioner if captioner is not None else self.needs_captions:
            _ = self.captioner
        return self

