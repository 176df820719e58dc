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
"""
from __future__ import annotations

from pathlib import Path

from offset_cir.errors import UserInputError

BASELINES = ("image", "text", "image+text")


class BaselineEncoder:
    """A backbone (:class:`offset_cir.model.backbone.Backbone`) scoring composed queries by ``mode``."""

    uses_masks = False
    uses_query_mask = False
    uses_target_mask = False

    def __init__(self, backbone, preprocess, tokenizer, mode: str, source: dict, target_identity: str):
        if mode not in BASELINES:
            raise UserInputError(f"unknown baseline {mode!r}; choose from {', '.join(BASELINES)}")
        self.backbone, self.preprocess, self.tokenizer = backbone, preprocess, tokenizer
        self.baseline = mode
        self.embed_dim = int(backbone.dims.embed_dim)
        self.config = {"baseline": mode, "backbone": backbone.name, **source,
                       "new_parameters": sorted(getattr(backbone.clip, "new_parameter_names", ()))}
        self.target_identity = target_identity

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model, mode: str, source: dict, target_identity: str) -> "BaselineEncoder":
        """The backbone, preprocessing and tokenizer of an OFFSET ``model`` (the rest of it is not used)."""
        return cls(model.backbone, model.preprocess, model.tokenizer, mode, source, target_identity)

    @classmethod
    def from_backbone(cls, name: str, pretrained: str | None, mode: str, seed: int = 0) -> "BaselineEncoder":
        """The backbone ``name`` with ``pretrained`` weights (an OpenCLIP tag, a local file, ``packaged``; None:
        ``packaged`` for a packaged backbone, else random weights, with a warning)."""
        import logging

        import torch

        from offset_cir.hashing import file_sha256, tagged
        from offset_cir.model.config import ModelConfig
        from offset_cir.model.offset import build_model
        from offset_cir.model.packaged import PRETRAINED_TAG, is_packaged

        if pretrained is None and is_packaged(name):
            pretrained = PRETRAINED_TAG
        elif pretrained is None:
            logging.getLogger(__name__).warning(
                "baseline %s of backbone %s without pretrained weights: its features are random (give --pretrained)",
                mode, name)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # a backbone's new projections (if any) are drawn from it
            model = build_model(ModelConfig(backbone=name, pretrained=pretrained))
        weights = tagged(file_sha256(pretrained)) if pretrained and Path(pretrained).is_file() else pretrained
        identity = f"baseline-target:{name}:{weights}:seed{seed}"
        return cls.from_model(model, mode, {"pretrained": pretrained, "seed": seed}, identity)

    @classmethod
    def from_checkpoint(cls, path, mode: str, checkpoint_key: str | None = None) -> "BaselineEncoder":
        """The backbone of a saved checkpoint (its fine-tuned weights); ``checkpoint_key``: its content hash when
        the caller has it."""
        from offset_cir.model.checkpoint import checkpoint_hash, load_checkpoint

        model = load_checkpoint(path)
        key = checkpoint_key or checkpoint_hash(path)
        return cls.from_model(model, mode, {"checkpoint": str(path), "checkpoint_hash": key},
                              f"baseline-target:checkpoint:{key}")

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
