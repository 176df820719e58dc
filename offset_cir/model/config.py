"""Model configuration: ``ModelConfig``, one typed dataclass; every variant and every ablation of the paper a field.

Defaults compute what the authors' release computes; a field where another value departs from the release says
so in its metadata (``offset info --deviations`` lists them). Reading, checking and writing:
:mod:`offset_cir.config_base`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

from offset_cir.config_base import Config, ConfigError, config_class, setting

GATE_SPLITS = ("release", "per_token")  # D4
TFM_ATTENTION = ("degenerate", "tokens")  # D10
GLOBAL_TOKEN = ("first", "mean")  # D11
TEXT_PADDING = ("include", "mask")  # D14

# Older names of the ablation switches (without the use_ prefix), accepted wherever a saved config is read (a
# checkpoint's config.json, a run folder's config.yaml, an index's model_config.json, an export's export.json).
# Reading maps old -> new; writing (to_dict) always uses the current names.
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


@config_class
class ModelConfig(Config):
    """Everything needed to rebuild an OFFSET model (saved as JSON beside each checkpoint)."""

    LEGACY_NAMES = LEGACY_FIELD_NAMES

    backbone: str = setting("tiny", "an OpenCLIP ViT name (ViT-H-14, ViT-B-16 ...), a packaged backbone "
                            "(efficientnet-lite0-minilm) or a package config (tiny, small).")
    pretrained: str | None = setting(None, "an OpenCLIP pretrained tag, a local weights file (.safetensors, or a "
                                     "state dict loaded with weights_only=True), 'packaged', or None for random "
                                     "initialisation.")
    focus_channels: int | None = setting(4, "P, the number of focus tokens multi-grained focus projection makes of "
                                         "the global set (and of the local set unless focus_channels_local is set). "
                                         "None leaves P unset: convert_release_checkpoint reads it from the "
                                         "release's weights (a model cannot be built before it is set).")
    focus_channels_local: int | None = setting(
        None, "D1: the number of focus tokens of the local set; None: focus_channels for both sets.", release=None,
        changes="the release's P=4, Q=8 default crashes (2P tokens against P+Q weights), so it ran with one width; "
                "an integer gives the local set its own width (the paper's P and Q).")
    vfm_heads: int = setting(4, "attention heads of the visual focus mapping (VFM).")
    tfm_heads: int = setting(4, "attention heads of the textual focus mapping (TFM).")
    gate_split: Literal["release", "per_token"] = setting(
        "release", "D4: how focus revision splits its gate G into a visual and a textual half.", release="release",
        changes="per_token takes gate_v = G[..., :D] and gate_t = G[..., D:] of the same token (the paper's evident "
                "intent); the release reshapes G so that each output token takes one half of another token's gate.")
    tfm_attention: Literal["degenerate", "tokens"] = setting(
        "degenerate", "D10: the attention of the textual focus mapping.", release="degenerate",
        changes="tokens lets the text tokens attend to the mask's patch tokens; the release attends between two "
                "sequences of length one (a softmax over one key).")
    global_token: Literal["first", "mean"] = setting(
        "first", "D11: which position of the fused visual map becomes its global token.", release="first",
        changes="mean averages every position instead of taking position 0.")
    text_padding: Literal["include", "mask"] = setting(
        "include", "D14: whether the positions after the end-of-text token enter the text's focus projection.",
        release="include", changes="mask leaves the positions after the end-of-text token out of the projection's "
                                   "softmax; the release includes every position.")
    shared_crop: bool = setting(
        False, "A1: one random crop shared by an image and its mask in training.", release=False,
        changes="true crops image and mask together, so the mask stays on its image; the release crops them "
                "independently.")
    use_masks: bool = setting(True, "ablation (1), w/o FM when false: no masks anywhere.")
    use_reference_vfm: bool = setting(True, "ablation (2), w/o VFM when false: the query's visual side ignores "
                                      "the mask.")
    use_tfm: bool = setting(True, "ablation (3), w/o TFM when false: the text's global set is [t].")
    use_focus_projection: bool = setting(True, "ablation (4), w/o MG-FP when false: mean pooling instead of "
                                         "attention pooling.")
    use_target_vfm: bool = setting(True, "ablation (5), w/o Target_VFM when false: the target is encoded without "
                                   "its mask.")
    use_target_focus_projection: bool = setting(True, "ablation (6), w/o Target_MGFP when false: the target's "
                                                "tokens are mean-pooled.")
    use_revision: bool = setting(True, "ablation (7), w/o Revision when false: F_c = F_r + F_m.")
    use_bbc_loss: bool = setting(True, "ablation (8), w/o BBC when false: the focus regularisation alone.")
    use_fr_loss: bool = setting(True, "ablation (9), w/o FR when false: the batch-based classification alone.")
    mu: float = setting(0.5, "weight of the focus regularisation in the total loss (the release's kappa).")
    tau: float = setting(0.1, "temperature of the focus regularisation.")
    logit_scale_init: float = setting(10.0, "initial value of the learned scale s of the batch-based "
                                      "classification.")
    grad_checkpointing: bool = setting(False, "recompute the backbone's activations in the backward pass (less "
                                       "memory, more compute).")
    batch_encoder_calls: bool = setting(True, "image and mask (and target) through the encoder in one call.")
    ablations: list[str] = setting([], "the names of the ablations applied (ABLATIONS), recorded for reports.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.focus_channels is not None and self.focus_channels < 1) or (
                self.focus_channels_local is not None and self.focus_channels_local < 1):
            raise ConfigError("ModelConfig.focus_channels must be >= 1")
        if (self.gate_split == "release" and self.use_focus_projection and self.focus_channels is not None
                and (self.p_global + self.p_local) % 2):
            raise ConfigError(
                f"ModelConfig: gate_split='release' (D4) pairs tokens two by two and needs an even token count; "
                f"focus_channels + focus_channels_local = {self.p_global + self.p_local} is odd "
                "(use gate_split='per_token')"
            )
        if not (self.use_bbc_loss or self.use_fr_loss):
            raise ConfigError("ModelConfig: at least one of use_bbc_loss and use_fr_loss must be on")
        for name in self.ablations:
            if name not in ABLATIONS:
                raise ConfigError(f"unknown ablation {name!r}; expected one of {sorted(ABLATIONS)}")
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
        """A copy with the named ablations of the paper's Table 4 switched off (see ``ABLATIONS``)."""
        changes: dict[str, Any] = {}
        for name in names:
            if name not in ABLATIONS:
                raise ConfigError(f"unknown ablation {name!r}; expected one of {sorted(ABLATIONS)}")
            changes.update(ABLATIONS[name])
        return dataclasses.replace(self, **changes, ablations=[*self.ablations, *names])


# The nine rows of the paper's Table 4, each a set of config switches.
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
