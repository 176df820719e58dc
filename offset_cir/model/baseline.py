"""Training-free baselines: a backbone's own pretrained features as a composed-retrieval model.

The rows every composed-image-retrieval table starts with (CIRR, Pic2Word, SEARLE ...) tell what a trained
model adds over its backbone:

- ``image``: the reference image's global feature g (the target's is the same function of the target image);
- ``text``: the modification text's global feature t;
- ``image+text``: the normalised sum of the two L2-normalised features, normalise(g/|g| + t/|t|), as the
  literature's "Image + Text" row computes it (Pic2Word's evaluation code names it the average of the image and
  text features: equal after normalisation).

The target side is always the image's global feature g, L2-normalised. No new module runs and nothing trains;
masks are not used. A backbone whose projections into the joint space are new (the packaged
``efficientnet-lite0-minilm``) gets them randomly initialised from ``seed``, so its rows are reproducible; such a
backbone's image and text features do not share a space, and its ``text`` / ``image+text`` rows say so by chance
level.

:class:`BaselineEncoder` offers the interface :func:`offset_cir.evaluate` and the search index use:
``encode_query(images, masks, texts)``, ``encode_target(images, masks)``, ``preprocess``, ``tokenize``,
``embed_dim``, ``config``, ``uses_masks`` (False), ``baseline`` (the mode, stamped into results), and
``target_identity``: a string naming what its gallery features depend on (the backbone's weights, not the mode:
the three rows share one encoded gallery).

:class:`BaselineSpec` names a baseline (the mode, and a backbone with its weights or a checkpoint for its backbone)
as the search index records it in its manifest; ``spec.build()`` makes its encoder.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from offset_cir.errors import CheckpointError, UserInputError

BASELINES = ("image", "text", "image+text")
#: the first part of every baseline's ``target_identity``
IDENTITY_PREFIX = "baseline-target:"
#: the endings of a weights file (a ``pretrained`` that has one, or a folder in it, names a file, not a tag)
WEIGHTS_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def check_mode(mode, what: str = "baseline") -> str:
    """``mode`` when it is one of :data:`BASELINES`; a UserInputError naming ``what`` otherwise."""
    if mode not in BASELINES:
        raise UserInputError(f"unknown {what} {mode!r}; choose from {', '.join(BASELINES)}")
    return mode


def _local_or_given(value: str | None) -> str | None:
    """An existing local file or folder as its absolute path (so a record of it holds from any folder); a tag, an
    ``hf-hub:`` name or None as given."""
    if value is None or str(value).startswith("hf-hub:") or not Path(value).exists():
        return value
    return str(Path(value).resolve())


@dataclasses.dataclass(frozen=True)
class BaselineSpec:
    """Which training-free baseline to build: the query ``mode`` and the backbone, given either by name with its
    weights or as a checkpoint's (exactly one of ``backbone`` and ``checkpoint``). Local paths are kept absolute."""

    #: the query side: "image", "text" or "image+text" (:data:`BASELINES`)
    mode: str
    #: the backbone's name (``offset info`` lists them); None when ``checkpoint`` gives it
    backbone: str | None = None
    #: with ``backbone``: an OpenCLIP tag, a local weights file, "packaged", or None ("packaged" for a packaged
    #: backbone, else random weights)
    pretrained: str | None = None
    #: a saved checkpoint whose (fine-tuned) backbone is used; None when ``backbone`` is given
    checkpoint: str | None = None
    #: the seed a backbone's new projections (if it has any) are drawn from
    seed: int = 0

    def __post_init__(self):
        check_mode(self.mode)
        if (self.backbone is None) == (self.checkpoint is None):
            raise UserInputError(f"baseline {self.mode}: give its backbone by name or a checkpoint for its backbone "
                                 f"(one of them), got backbone={self.backbone!r}, checkpoint={self.checkpoint!r}")
        if self.pretrained is not None and self.backbone is None:
            raise UserInputError("a baseline's pretrained weights go with its backbone name, not with a checkpoint")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise UserInputError(f"a baseline's seed is a whole number, got {self.seed!r}")
        pretrained = self.pretrained
        if pretrained is None and self.backbone is not None:
            from offset_cir.model.packaged import PRETRAINED_TAG, is_packaged

            pretrained = PRETRAINED_TAG if is_packaged(self.backbone) else None
        object.__setattr__(self, "pretrained", _local_or_given(pretrained))
        object.__setattr__(self, "checkpoint", _local_or_given(self.checkpoint))

    def with_mode(self, mode: str) -> "BaselineSpec":
        """The same backbone with another query side."""
        return dataclasses.replace(self, mode=mode)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data, source: str) -> "BaselineSpec":
        """The spec ``to_json`` wrote, read back from ``source`` (named, with the field, when malformed)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or not set(data) <= fields or "mode" not in data:
            raise UserInputError(f"{source}: field 'baseline' must be an object with 'mode' and some of "
                                 f"{', '.join(sorted(fields))}, got {str(data)[:120]}")
        for key in ("backbone", "pretrained", "checkpoint"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise UserInputError(f"{source}: field 'baseline.{key}' must be a string or null, got {data[key]!r}")
        try:
            return cls(**data)
        except UserInputError as exc:
            raise UserInputError(f"{source}: field 'baseline': {exc}") from None

    def describe(self) -> str:
        """``backbone ViT-B-16 (weights openai)`` or ``the backbone of checkpoint runs/x/best`` (for messages)."""
        if self.checkpoint is not None:
            return f"the backbone of checkpoint {self.checkpoint}"
        return f"backbone {self.backbone} (weights {self.pretrained or 'none: random'})"

    def label(self) -> str:
        """``baseline image of backbone ViT-B-16 (weights openai)`` (for messages)."""
        return f"baseline {self.mode} of {self.describe()}"

    def target_identity(self, checkpoint_key: str | None = None) -> str:
        """What the gallery features depend on, without building anything: the backbone and its weights (a local
        file by its content hash, a tag by its name) and the seed, or the checkpoint's content hash
        (``checkpoint_key`` when the caller has it); never the mode."""
        if self.checkpoint is not None:
            from offset_cir.model.checkpoint import checkpoint_hash

            return f"{IDENTITY_PREFIX}checkpoint:{checkpoint_key or checkpoint_hash(self.checkpoint)}"
        from offset_cir.hashing import file_sha256, tagged

        p = self.pretrained
        if p and not Path(p).is_file() and ("/" in p or "\\" in p or Path(p).suffix in WEIGHTS_SUFFIXES):
            raise CheckpointError(f"{self.label()}: the weights file {p} does not exist (if it moved, name where it "
                                  f"is now: --pretrained FILE)")
        weights = tagged(file_sha256(p)) if p and Path(p).is_file() else p
        return f"{IDENTITY_PREFIX}{self.backbone}:{weights}:seed{self.seed}"

    def build(self, checkpoint_key: str | None = None) -> "BaselineEncoder":
        """The encoder (on the CPU); ``checkpoint_key``: the checkpoint's content hash when the caller has it."""
        if self.checkpoint is not None:
            return BaselineEncoder.from_checkpoint(self.checkpoint, self.mode, checkpoint_key=checkpoint_key)
        return BaselineEncoder.from_backbone(self.backbone, self.pretrained, self.mode, seed=self.seed)


class BaselineEncoder:
    """A backbone (:class:`offset_cir.model.backbone.Backbone`) scoring composed queries by ``mode``."""

    uses_masks = False
    uses_query_mask = False
    uses_target_mask = False

    def __init__(self, backbone, preprocess, tokenizer, mode: str, source: dict, target_identity: str,
                 spec: BaselineSpec | None = None):
        self.backbone, self.preprocess, self.tokenizer = backbone, preprocess, tokenizer
        self.baseline = check_mode(mode)
        #: the :class:`BaselineSpec` it was built from (None when made from an in-memory model)
        self.spec = spec
        self.embed_dim = int(backbone.dims.embed_dim)
        self.config = {"baseline": mode, "backbone": backbone.name, **source,
                       "new_parameters": sorted(getattr(backbone.clip, "new_parameter_names", ()))}
        self.target_identity = target_identity

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model, mode: str, source: dict, target_identity: str,
                   spec: BaselineSpec | None = None) -> "BaselineEncoder":
        """The backbone, preprocessing and tokenizer of an OFFSET ``model`` (the rest of it is not used)."""
        return cls(model.backbone, model.preprocess, model.tokenizer, mode, source, target_identity, spec)

    @classmethod
    def from_backbone(cls, name: str, pretrained: str | None, mode: str, seed: int = 0) -> "BaselineEncoder":
        """The backbone ``name`` with ``pretrained`` weights (an OpenCLIP tag, a local file, ``packaged``; None:
        ``packaged`` for a packaged backbone, else random weights, with a warning)."""
        import logging

        import torch

        from offset_cir.model.config import ModelConfig
        from offset_cir.model.offset import build_model

        spec = BaselineSpec(mode, backbone=name, pretrained=pretrained, seed=seed)
        if spec.pretrained is None:
            logging.getLogger(__name__).warning(
                "baseline %s of backbone %s without pretrained weights: its features are random (give --pretrained)",
                mode, name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # a backbone's new projections (if any) are drawn from it
            model = build_model(ModelConfig(backbone=name, pretrained=spec.pretrained))
        return cls.from_model(model, mode, {"pretrained": spec.pretrained, "seed": seed}, spec.target_identity(),
                              spec)

    @classmethod
    def from_checkpoint(cls, path, mode: str, checkpoint_key: str | None = None) -> "BaselineEncoder":
        """The backbone of a saved checkpoint (its fine-tuned weights); ``checkpoint_key``: its content hash when
        the caller has it."""
        from offset_cir.model.checkpoint import checkpoint_hash, load_checkpoint

        spec = BaselineSpec(mode, checkpoint=str(path))
        key = checkpoint_key or checkpoint_hash(path)
        model = load_checkpoint(path)
        return cls.from_model(model, mode, {"checkpoint": str(path), "checkpoint_hash": key},
                              spec.target_identity(key), spec)

    def label(self) -> str:
        """What it is, for messages: ``baseline MODE of`` its spec's backbone, else its backbone's name."""
        if self.spec is not None:
            return self.spec.label()
        return f"baseline {self.baseline} of backbone {self.backbone.name} (in memory)"

    # ------------------------------------------------------------------ module-like
    def to(self, device=None, *args, **kwargs) -> "BaselineEncoder":
        self.backbone.to(device, *args, **kwargs)
        return self

    def eval(self) -> "BaselineEncoder":
        self.backbone.eval()
        return self

    def train(self, mode: bool = True) -> "BaselineEncoder":
        self.backbone.train(mode)
        return self

    @property
    def training(self) -> bool:
        return self.backbone.training

    def parameters(self):
        return self.backbone.parameters()

    def state_dict(self) -> dict:
        return self.backbone.state_dict()

    @property
    def device(self):
        return next(self.backbone.parameters()).device

    # ------------------------------------------------------------------ features
    def tokenize(self, texts):
        if isinstance(texts, str):
            texts = [texts]
        return self.tokenizer(list(texts)).to(self.device)

    def _image(self, images):
        import torch.nn.functional as F

        return F.normalize(self.backbone.encode_image(images.to(self.device))[1].float(), dim=-1)

    def _text(self, texts):
        import torch
        import torch.nn.functional as F

        tokens = texts.to(self.device) if isinstance(texts, torch.Tensor) else self.tokenize(texts)
        return F.normalize(self.backbone.encode_text(tokens)[1].float(), dim=-1)

    def encode_target(self, images, masks=None):
        """L2-normalised global image features [B, D] (``masks`` are not used)."""
        return self._image(images)

    def encode_query(self, images, masks, texts):
        """L2-normalised [B, D]: the reference image's feature, the text's, or their normalised sum (``mode``)."""
        import torch.nn.functional as F

        if self.baseline == "image":
            return self._image(images)
        if self.baseline == "text":
            return self._text(texts)
        return F.normalize(self._image(images) + self._text(texts), dim=-1)

    def __repr__(self) -> str:
        return f"BaselineEncoder({self.baseline!r}, backbone={self.backbone.name!r})"
