"""Model configuration: one typed dataclass, every SPEC section 4 variant and every ablation a field.

Defaults compute what the authors' release computes (SPEC section 4, "default" column).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

GATE_SPLITS = ("release", "per_token")  # D4
TFM_ATTENTION = ("degenerate", "tokens")  # D10
GLOBAL_TOKEN = ("first", "mean")  # D11
TEXT_PADDING = ("include", "mask")  # D14


@dataclass
class ModelConfig:
    """Everything needed to rebuild an OFFSET model (saved as JSON beside each checkpoint).

    backbone: an OpenCLIP ViT name (``ViT-H-14``, ``ViT-B-16`` ...) or a package config (``tiny``, ``small``).
    pretrained: an OpenCLIP pretrained tag, a local weights file (.safetensors, or a state dict loaded with
    ``weights_only=True``), or None for random initialisation.
    """

    backbone: str = "tiny"
    pretrained: str | None = None
    # SPEC 3, MG-FP focus channels; D1: focus_channels_local=None means one width P for both sets.
    # focus_channels=None leaves P unset: ``convert_release_checkpoint`` reads it from the release's weights (a model
    # cannot be built before it is set).
    focus_channels: int | None = 4
    focus_channels_local: int | None = None
    vfm_heads: int = 4
    tfm_heads: int = 4
    # SPEC 4 variants
    gate_split: str = "release"  # D4: "release" | "per_token"
    tfm_attention: str = "degenerate"  # D10: "degenerate" | "tokens"
    global_token: str = "first"  # D11: "first" (position 0) | "mean"
    text_padding: str = "include"  # D14: "include" | "mask"
    shared_crop: bool = False  # A1: one random crop shared by image and mask in training
    # Ablations of the paper's Table 4 (SPEC 4); True = component present. Each switch is named use_<component>
    # (configs saved before that naming still load: see LEGACY_FIELD_NAMES).
    use_masks: bool = True  # (1) w/o FM when False: no masks anywhere
    use_reference_vfm: bool = True  # (2) w/o VFM: the query's visual side ignores the mask
    use_tfm: bool = True  # (3) w/o TFM: the text global set is [t]
    use_focus_projection: bool = True  # (4) w/o MG-FP: mean pooling instead of attention pooling
    use_target_vfm: bool = True  # (5) w/o Target_VFM: target encoded without its mask
    use_target_focus_projection: bool = True  # (6) w/o Target_MGFP: target tokens mean-pooled
    use_revision: bool = True  # (7) w/o Revision: F_c = F_r + F_m
    use_bbc_loss: bool = True  # (8) w/o BBC: FR only
    use_fr_loss: bool = True  # (9) w/o FR: BBC only
    # Losses (SPEC 3)
    mu: float = 0.5
    tau: float = 0.1
    logit_scale_init: float = 10.0
    # Engineering
    grad_checkpointing: bool = False
    batch_encoder_calls: bool = True  # image and mask (and target) through the encoder in one call
    ablations: list[str] = field(default_factory=list)  # names applied, recorded for reports

    def __post_init__(self) -> None:
        for name, allowed in (
            ("gate_split", GATE_SPLITS),
            ("tfm_attention", TFM_ATTENTION),
            ("global_token", GLOBAL_TOKEN),
            ("text_padding", TEXT_PADDING),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: expected one of {allowed}")
        if (self.focus_channels is not None and self.focus_channels < 1) or (
                self.focus_channels_local is not None and self.focus_channels_local < 1):
            raise ValueError("ModelConfig.focus_channels must be >= 1")
        if (self.gate_split == "release" and self.use_focus_projection and self.focus_channels is not None
                and (self.p_global + self.p_local) % 2):
            raise ValueError(
                f"ModelConfig: gate_split='release' (D4) pairs tokens two by two and needs an even token count; "
                f"focus_channels + focus_channels_local = {self.p_global + self.p_local} is odd (use gate_split='per_token')"
            )
        if not (self.use_bbc_loss or self.use_fr_loss):
            raise ValueError("ModelConfig: at least one of use_bbc_loss and use_fr_loss must be on")
        for name in self.ablations:
            if name not in ABLATIONS:
                raise ValueError(f"unknown ablation {name!r}; expected one of {sorted(ABLATIONS)}")
        if not self.use_masks:
            # Without masks nothing mask-guided can remain (ablation (1)).
            self.use_reference_vfm = self.use_tfm = self.use_target_vfm = False

    @property
    def p_global(self) -> int:
        return self.focus_channels

    @property
    def p_local(self) -> int:
        return self.focus_channels if self.focus_channels_local is None else self.focus_channels_local

    def with_ablation(self, *names: str) -> "ModelConfig":
        """A copy with the named ablations of SPEC section 4 switched off (see ``ABLATIONS``)."""
        changes: dict[str, Any] = {}
        for name in names:
            if name not in ABLATIONS:
                raise ValueError(f"unknown ablation {name!r}; expected one of {sorted(ABLATIONS)}")
            changes.update(ABLATIONS[name])
        return dataclasses.replace(self, **changes, ablations=[*self.ablations, *names])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """A config from its ``to_dict`` form; a saved config's old field names are read as the new ones
        (``LEGACY_FIELD_NAMES``), so checkpoints and run folders written before the renaming still load."""
        data = upgrade_field_names(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)


# Field names of ModelConfig before every ablation switch was named use_<component> (issue 11): a saved config
# (a checkpoint's config.json, a run folder's config.yaml, an index's model_config.json, an export's export.json)
# may hold the old name. Reading maps old -> new; writing (to_dict) always uses the new names.
LEGACY_FIELD_NAMES: dict[str, str] = {
    "reference_vfm": "use_reference_vfm",
    "tfm": "use_tfm",
    "focus_projection": "use_focus_projection",
    "target_vfm": "use_target_vfm",
    "target_focus_projection": "use_target_focus_projection",
    "revision": "use_revision",
    "bbc_loss": "use_bbc_loss",
    "fr_loss": "use_fr_loss",
}


def upgrade_field_names(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of a ModelConfig mapping with the old field names (``LEGACY_FIELD_NAMES``) replaced by the new
    ones. A mapping holding both an old name and its new one is refused (which of the two values is meant?)."""
    if not isinstance(data, dict):
        return data
    out = dict(data)
    for old, new in LEGACY_FIELD_NAMES.items():
        if old in out:
            if new in out:
                raise ValueError(f"ModelConfig: both {old!r} (the old name) and {new!r} are given; keep only {new!r}")
            out[new] = out.pop(old)
    return out


# The nine rows of the paper's Table 4 (SPEC section 4), each a set of config switches.
ABLATIONS: dict[str, dict[str, Any]] = {
    "wo_fm": {"use_masks": False, "use_reference_vfm": False, "use_tfm": False, "use_target_vfm": False},
    "wo_vfm": {"use_reference_vfm": False},
    "wo_tfm": {"use_tfm": False},
    "wo_mgfp": {"use_focus_projection": False},
    "wo_target_vfm": {"use_target_vfm": False},
    "wo_target_mgfp": {"use_target_focus_projection": False},
    "wo_revision": {"use_revision": False},
    "wo_bbc": {"use_bbc_loss": False},
    "wo_fr": {"use_fr_loss": False},
}
