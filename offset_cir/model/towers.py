"""The OpenCLIP model and tokenizer behind a backbone name: the package's configurations, weights, normalisation.

``create_clip(name, pretrained)`` builds the model of a registered name (:mod:`offset_cir.model.registry`: the
package's random-init configurations ``tiny``/``small`` below and the packaged backbones) or of an OpenCLIP name,
with its weights from an OpenCLIP tag, a local file or none, and offline-aware errors; ``make_tokenizer`` gives the
tokenizer that goes with it. :class:`offset_cir.model.backbone.Backbone` wraps the model for OFFSET.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from torch import nn

from offset_cir.errors import OfflineError, UserInputError
from offset_cir.hub import hub_reachable
from offset_cir.model.registry import (RegisteredConfigs, backbone_family, get_backbone_entry, is_registered,
                                       list_backbones, register_backbone)
from offset_cir.model.preprocess import OPENAI_MEAN, OPENAI_STD
from offset_cir.model.weights import load_state_strict, load_weights_file

log = logging.getLogger(__name__)

PACKAGE_CONFIG_FAMILY = "package config (random init)"


def available_backbones() -> list[str]:
    """Every backbone name this version can build: ``list_backbones(open_clip=True)``."""
    return list_backbones(open_clip=True)


def build_clip_from_config(cfg: dict) -> nn.Module:
    """An OpenCLIP model from a config dict (OpenCLIP's schema), random init, nothing downloaded.

    The model class follows OpenCLIP's rule: ``CustomTextCLIP`` for ``custom_text`` configs and HF text towers
    (CoCa with a ``multimodal_cfg``), ``CLIP`` otherwise.
    """
    import copy

    from open_clip.model import CLIP, CustomTextCLIP

    cfg = copy.deepcopy(cfg)
    custom_text = cfg.pop("custom_text", False)
    cfg.pop("multimodal_cfg", None)
    vision, text = cfg.setdefault("vision_cfg", {}), cfg.setdefault("text_cfg", {})
    if "timm_model_name" in vision:
        vision["timm_model_pretrained"] = False
    if "hf_model_name" in text:
        text["hf_model_pretrained"] = False
        custom_text = True
    cls = CustomTextCLIP if custom_text else CLIP
    model = cls(**cfg)
    if "hf_model_name" in text:
        model.context_length = int(text.get("context_length", 77))
    return model


_DO_NOT_FIT = "weights do not fit this backbone"


def create_from_config(name: str, pretrained: str | None = None) -> nn.Module:
    """A registered package configuration, random init; ``pretrained`` may name a local weights file."""
    model = build_clip_from_config(get_backbone_entry(name).config)
    if pretrained:
        if not Path(pretrained).is_file():
            raise UserInputError(
                f"backbone {name!r} is a package configuration: pretrained must be a local weights file, "
                f"got {pretrained!r}"
            )
        load_state_strict(model, load_weights_file(pretrained), pretrained, what=_DO_NOT_FIT)
    return model


# Small configurations the package defines for offline use (random init only), registered by name. Same schema as
# OpenCLIP's model_configs JSON files (``custom_text``, ``timm_model_name`` and ``hf_model_name`` work too).
PACKAGE_BACKBONES = RegisteredConfigs(create_from_config, family=PACKAGE_CONFIG_FAMILY,
                                      summary="a package configuration (random init)")
register_backbone("tiny", family=PACKAGE_CONFIG_FAMILY, config={
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 48, "heads": 2, "layers": 2},
}, summary="64 px, patch 8 (8x8 grid), C_v=64, C_t=48, D=32: small enough for fast CPU tests")(create_from_config)
register_backbone("small", family=PACKAGE_CONFIG_FAMILY, config={
    "embed_dim": 48,
    "vision_cfg": {"image_size": 96, "layers": 2, "width": 96, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 40, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}, summary="96 px, patch 16 (6x6 grid), C_v=96, C_t=64, D=48: a second shape for tests")(create_from_config)


def _tag_normalisation(name: str, tag: str | None = None) -> tuple[tuple, tuple] | None:
    """(mean, std) of the OpenCLIP pretrained tag ``tag`` of ``name``; with no (known) tag, the one shared by every
    tag of ``name``, or None when they differ / there is none."""
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(name)
    seen = set()
    for known in ([tag] if tag in tags else tags):
        pcfg = open_clip.get_pretrained_cfg(name, known) or {}
        seen.add((tuple(pcfg.get("mean", OPENAI_MEAN)), tuple(pcfg.get("std", OPENAI_STD))))
    return seen.pop() if len(seen) == 1 else None


def _set_normalisation(model: nn.Module, name: str, tag: str | None = None) -> None:
    """Without weights from a tag, OpenCLIP sets OpenAI's normalisation; the tower's own (SigLIP's 0.5/0.5 ...) is
    that of ``tag`` (the tag the weights come from) or, with none, the one all its tags share."""
    norm = _tag_normalisation(name, tag)
    visual = model.visual
    pcfg = dict(getattr(visual, "preprocess_cfg", None) or {})
    if norm is not None:
        pcfg["mean"], pcfg["std"] = norm
    visual.preprocess_cfg = pcfg


def create_clip(name: str, pretrained: str | None, load_weights: bool = True) -> nn.Module:
    """An OpenCLIP model by name; ``pretrained`` is a tag, a local file, or None (random init).

    ``load_weights=False`` builds the architecture ``pretrained`` names with random weights, reading and fetching
    nothing (``pretrained`` is not checked), and with the normalisation of its tag: for a model whose weights come
    from elsewhere next (a checkpoint, a resumed run), as open_clip's ``create_model(load_weights=False)``."""
    import open_clip

    if is_registered(name):
        return get_backbone_entry(name).create(name, pretrained if load_weights else None)
    if name not in open_clip.list_models():
        raise UserInputError(
            f"unknown backbone {name!r}: expected one of the package's {list_backbones()} "
            "or an OpenCLIP model name (see `offset info`)"
        )
    if backbone_family(name) is None:
        raise UserInputError(
            f"backbone {name!r}: this OpenCLIP architecture is not supported (see `offset info` for those that are)"
        )
    hf_text = "hf_model_name" in (open_clip.get_model_config(name) or {}).get("text_cfg", {})
    if not load_weights:
        model = _create_random(name, hf_text)
        _set_normalisation(model, name, pretrained)
        return model
    if pretrained and Path(pretrained).is_file():
        model = _create_random(name, hf_text)
        load_state_strict(model, load_weights_file(pretrained), pretrained, what=_DO_NOT_FIT)
        _set_normalisation(model, name)
        return model
    if pretrained:
        known = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in known:
            raise UserInputError(
                f"pretrained={pretrained!r} is neither a local file nor an OpenCLIP tag of {name} (tags: {known})"
            )
        if not hub_reachable():
            # Weights may still be cached locally; try without the network, fail fast otherwise.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            model = open_clip.create_model(name, pretrained=pretrained)
        except Exception as exc:
            raise OfflineError(
                f"could not load OpenCLIP weights {name}/{pretrained} ({type(exc).__name__}: {str(exc)[:200]}). "
                "The model hub is not reachable from here: download the weights elsewhere and pass the local file, "
                "e.g. `pretrained=/path/to/open_clip_model.safetensors` (model.pretrained=... on the command line)."
            ) from exc
        _set_context_length(model, name)
        return model
    model = _create_random(name, hf_text)
    _set_normalisation(model, name)
    return model


def _create_random(name: str, hf_text: bool) -> nn.Module:
    import open_clip

    try:
        # pretrained_text=False: random init means random init for an HF text tower too (only its config is read).
        model = open_clip.create_model(name, pretrained=None, pretrained_text=False)
    except OSError as exc:  # an HF text tower whose config is neither cached nor reachable
        if not hf_text:
            raise
        raise OfflineError(
            f"backbone {name!r}: its Hugging Face text tower's config could not be read ({str(exc)[:200]}); "
            "it needs the Hugging Face hub or its local cache"
        ) from exc
    _set_context_length(model, name)
    return model


def _set_context_length(model: nn.Module, name: str) -> None:
    """HF towers report their position count (512 ...) as context length; captions use OpenCLIP's tokenizer
    length (the config's, default 77)."""
    import open_clip

    text_cfg = (open_clip.get_model_config(name) or {}).get("text_cfg", {})
    if "hf_model_name" in text_cfg:
        model.context_length = int(text_cfg.get("context_length", 77))


def make_tokenizer(name: str, context_length: int, backbone=None):
    """The tokenizer for ``name`` (``backbone``: its built :class:`~offset_cir.model.backbone.Backbone`, whose
    text tower may carry its own tokenizer files); falls back to OpenCLIP's BPE tokenizer only where its ids fit
    the vocabulary."""
    import open_clip
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    entry = get_backbone_entry(name) if is_registered(name) else None
    if entry is not None and entry.tokenizer is not None:
        tok = entry.tokenizer(name, context_length)
        if tok is not None:
            return tok
    hf_dir = None
    if backbone is not None and backbone.text_kind == "hf":
        path = getattr(backbone.clip.text.config, "_name_or_path", "")
        hf_dir = path if path and Path(path).is_dir() else None
    if hf_dir is not None or entry is None:  # a registered entry without a tokenizer of its own: OpenCLIP's BPE
        try:
            if hf_dir is not None:  # a local Hugging Face folder carries its own tokenizer files
                return HFTokenizer(hf_dir, context_length=context_length)
            return open_clip.get_tokenizer(name, context_length=context_length)
        except Exception as exc:  # an HF tokenizer that cannot be fetched offline
            vocab = getattr(backbone._text_module, "vocab_size", None) if backbone is not None else None
            if hf_dir is not None or (vocab is not None and vocab < 49408):
                return _UnavailableTokenizer(name, exc)  # OpenCLIP's BPE ids would not fit this vocabulary
            log.warning("tokenizer of %s unavailable (%s); using OpenCLIP's BPE tokenizer", name, exc)
    return SimpleTokenizer(context_length=context_length)


class _UnavailableTokenizer:
    """Stands in for a tokenizer that cannot be loaded offline: token id tensors still work; strings fail clearly."""

    def __init__(self, name: str, exc: Exception):
        self.name, self.reason = name, f"{type(exc).__name__}: {str(exc)[:200]}"

    def __call__(self, texts, *args, **kwargs):
        raise OfflineError(
            f"the tokenizer of backbone {self.name!r} is not available offline ({self.reason}); "
            "pass token id tensors, or make the tokenizer files available (Hugging Face cache or a local folder)"
        )
