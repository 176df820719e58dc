"""Load state dicts saved by the authors' OFFSET release (docs/model.md#release-checkpoints) into this package's model.

The file must be a plain state dict (``.safetensors``, or a torch file that loads with ``weights_only=True``);
pickled modules are refused. Backbone keys (``backbone.clip.*``) keep OpenCLIP's names; the new modules are
renamed below; 4-d 1x1 convolution kernels become this package's 1-d ones.
"""
from __future__ import annotations

import logging
import os

import torch

from offset_cir.errors import CheckpointError
from offset_cir.model.config import ModelConfig
from offset_cir.model.weights import compare_state, load_weights_file

log = logging.getLogger(__name__)

# release prefix -> our prefix (longest first when matching)
RENAMES: dict[str, str] = {
    "loss_T": "logit_scale",
    "backbone.fc.": "image_fc.",
    "backbone.text_fc.": "text_fc.",
    "backbone.chanel_score.": "visual_projection.score.",
    "backbone.chanel_score_text.": "text_projection.score.",
    "backbone.cross_attention.norm_A.": "vfm.norm_image.",
    "backbone.cross_attention.norm_B.": "vfm.norm_mask.",
    "backbone.cross_attention.qkv_A.": "vfm.qkv_image.",
    "backbone.cross_attention.qkv_B.": "vfm.qkv_mask.",
    "backbone.cross_attention.out_A.": "vfm.out_image.",
    "backbone.cross_attention.out_B.": "vfm.out_mask.",
    "backbone.seg_fusion.fusion_proj.": "vfm.fusion.",
    "backbone.cross_attention_text.qkv_A.": "tfm.qkv_text.",
    "backbone.cross_attention_text.qkv_B.": "tfm.qkv_mask.",
    "backbone.cross_attention_text.out_A.": "tfm.out_text.",
    "backbone.cross_attention_text.out_B.": "tfm.out_mask.",
    "backbone.segText_fusion.": "tfm.fusion.",
    "affine.MLP.": "revision.mlp.",
    "backbone.clip.": "backbone.clip.",
}
# Present in the release's files but not part of the model (docs/model.md#release-checkpoints).
IGNORED_PREFIXES = (
    "local_weight",
    "backbone.attention_spatial.",
    "affine.cross_attention_text.",
    "backbone.cross_attention_text.norm_A.",
    "backbone.cross_attention_text.norm_B.",
)


def rename_release_key(key: str) -> str | None:
    """Our name for a release key, or None when the key is ignored. Raises for an unknown key."""
    if key.startswith("module."):  # saved from a DistributedDataParallel wrapper
        key = key[len("module."):]
    if key.startswith(IGNORED_PREFIXES):
        return None
    for old in sorted(RENAMES, key=len, reverse=True):
        if key == old or key.startswith(old):
            return RENAMES[old] + key[len(old):]
    raise CheckpointError(f"release checkpoint key {key!r} is not part of OFFSET (docs/model.md#release-checkpoints)")


def map_release_state(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = rename_release_key(key)
        if new is None:
            continue
        if new in expected and value.dim() == 4 and expected[new].dim() == 3 and value.shape[-2:] == (1, 1):
            value = value[..., 0]  # 1x1 Conv2d kernel -> Conv1d kernel
        if new in expected and value.shape != expected[new].shape and value.numel() == expected[new].numel():
            value = value.reshape(expected[new].shape)  # e.g. a scalar logit scale saved as []
        out[new] = value
    return out


# The release's MG-FP output convs: P rows each (docs/model.md#release-checkpoints; the release runs with one width P for both sets, D1).
FOCUS_CHANNEL_KEYS = ("backbone.chanel_score.2.weight", "backbone.chanel_score_text.2.weight")


def release_focus_channels(state: dict[str, torch.Tensor], source: str) -> int | None:
    """P as the release's weights hold it (rows of the MG-FP output convs), None when they hold no MG-FP."""
    found = {}
    for key, value in state.items():
        name = key[len("module."):] if key.startswith("module.") else key
        if name in FOCUS_CHANNEL_KEYS:
            found[name] = int(value.shape[0])
    if len(set(found.values())) > 1:
        raise CheckpointError(f"{source}: the visual and text MG-FP disagree on P: "
                              + ", ".join(f"{k} has {v} rows" for k, v in sorted(found.items())))
    return next(iter(found.values()), None)


def convert_release_checkpoint(state_dict_path: str | os.PathLike, config: ModelConfig):
    """Build OFFSET for ``config`` and load a release state dict into it (``weights_only=True``).

    P (``focus_channels``) comes from the weights when ``config.focus_channels`` is None; a config that sets
    another P than the weights hold is refused with both values named."""
    import dataclasses

    from offset_cir.model.offset import OFFSET

    state = load_weights_file(state_dict_path)
    p_file = release_focus_channels(state, str(state_dict_path))
    if config.focus_channels is None:
        if p_file is None:
            raise CheckpointError(f"{state_dict_path}: no {FOCUS_CHANNEL_KEYS[0]} to read P from; "
                                  "set focus_channels in the config")
        config = dataclasses.replace(config, focus_channels=p_file)
        log.info("release checkpoint %s: P = %d focus channels (from %s)", state_dict_path, p_file, FOCUS_CHANNEL_KEYS[0])
    else:
        wanted = {config.p_global} | ({config.p_local} if config.focus_channels_local is not None else set())
        if p_file is not None and wanted != {p_file}:
            asked = (f"focus_channels={config.focus_channels}" + (
                f", focus_channels_local={config.focus_channels_local}" if config.focus_channels_local is not None else ""))
            raise CheckpointError(
                f"{state_dict_path}: the release checkpoint has P={p_file} focus channels ({FOCUS_CHANNEL_KEYS[0]} has "
                f"{p_file} rows) but the config sets {asked}; set focus_channels={p_file}, or leave it unset (None) "
                "to take it from the checkpoint")
    model = OFFSET(config, load_weights=False)  # every weight comes from the release file
    expected = model.state_dict()
    mapped = map_release_state(state, expected)
    compare_state(expected, mapped, f"{state_dict_path} (release layout)")
    model.load_state_dict(mapped)
    log.info("loaded %d release tensors into OFFSET(%s)", len(mapped), config.backbone)
    return model
