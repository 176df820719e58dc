"""Training configuration: typed dataclasses, YAML presets (``offset_cir/configs``) and ``key=value`` overrides.

Three kinds of YAML file, each a mapping that may start from another with ``base: NAME`` (merged key by key):

- ``configs/release.yaml``: the release's training recipe (docs/model.md#training: ViT-H-14, AdamW, learning rates and
  their decay, batch, precision, epochs, evaluation, early stopping, seed). Not a preset of its own: it names no
  dataset.
- a preset per dataset (``fashioniq``, ``shoes``, ``cirr``, ``fashion200k``: ``base: release``; ``synthetic``, the
  tiny backbone from scratch, and the demo presets on top of it), and an experiment per paper row
  (``configs/experiment/<name>.yaml``: ``base:`` a preset, a few keys changed).
- ``configs/machine/<name>.yaml``: the settings of the machine a run trains on, apart from any experiment:
  ``device``, ``data.num_workers`` and ``data_roots`` (where each benchmark lives: ``data.root`` of a config
  that sets none). ``default`` (device auto, data loaded in the main process), ``server`` (the release presets':
  four loader workers), ``cpu`` (the CPU even where a GPU is present); a YAML file path works too.

The machine is picked with the key ``machine: NAME`` (in a config, or ``machine=NAME`` on the command line; the
release presets say ``server``, the others fall back to ``default``). Its settings lie under the experiment's:
a config or an override that sets ``device`` or ``data.num_workers`` itself wins. Precision stays with the
experiment: ``precision: auto`` already follows the device (fp16 with a grad scaler on CUDA, fp32 on the CPU).
A run's ``config.yaml`` records the resolved values, so a resume needs no machine file.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from offset_cir.config_base import (Config, PerDataset, Renamed, config_class, load_yaml,
                                    parse_overrides, setting)
from offset_cir.errors import UserInputError
from offset_cir.model.config import ModelConfig

__all__ = ["DataConfig", "OptimConfig", "TrainConfig", "load_config", "parse_overrides", "preset_names", "to_yaml"]

#: the benchmarks whose presets rest on the release's recipe (``base: release``)
RELEASE_PRESETS = ("fashioniq", "shoes", "cirr", "fashion200k")


@config_class
class DataConfig(Config):
    """The benchmark a run trains and validates on."""

    dataset: str = setting("synthetic", "the benchmark: fashioniq, shoes, cirr, fashion200k or synthetic.")
    root: str = setting("data/synthetic", "its folder (the machine's data_roots fill it when a config sets none).")
    train_split: str = setting("train", "the split trained on.")
    val_split: str = setting("val", "the split evaluated during training.")
    protocol: str | None = setting(None, "the evaluation protocol during training; None: the dataset's default.")
    num_workers: int = setting(0, "DataLoader worker processes (a machine setting).")
    settings: dict[str, Any] = setting({}, "the loader's own settings (offset_cir.data.get_dataset), e.g. "
                                           "categories, mask_root.")
    clipseg_maps: Literal["release", "aligned"] | None = setting(
        None, "how masks that are CLIPSeg's square sigmoid maps at its input size (352x352: the release's "
              "segmentation download) load when their image has another size: 'release' sends each through the "
              "image transform on its own, as the release does (on a non-square image the mask then covers the "
              "whole squashed image while the image tensor is its centre crop); 'aligned' first resizes it to its "
              "image's size, so both get the same crop; None refuses them, as it refuses any mask of another size "
              "than its image.",
        release="release", changes="aligned resizes each map to its image first, so mask and image tensor share "
                                   "one crop; null refuses such maps (every mask must then have its image's size).")


def _one_based(epochs: Any) -> Any:
    """``decay_epochs`` (compared with an epoch counted from 0) as ``decay_epochs_1based``: the same schedule."""
    if not isinstance(epochs, list):
        return epochs
    return [e + 1 if isinstance(e, int) and not isinstance(e, bool) else e for e in epochs]


@config_class
class OptimConfig(Config):
    """The optimiser (AdamW, two parameter groups) and its step decay."""

    LEGACY_NAMES = {"decay_epochs": Renamed("decay_epochs_1based", _one_based,
                                            "decay_epochs counts epochs from 0: the same schedule")}

    backbone_lr: float = setting(1e-5, "learning rate of the backbone's parameters.")
    new_lr: float = setting(1e-4, "learning rate of the new modules (the logit scale included).")
    weight_decay: float = setting(0.01, "AdamW's weight decay (both groups).")
    betas: tuple[float, float] = setting((0.9, 0.999), "AdamW's betas.")
    eps: float = setting(1e-8, "AdamW's eps.")
    decay_epochs_1based: list[int] = setting(
        [5, 10], "the epochs, counted from 1 (the first epoch is epoch 1, as logs and metrics.jsonl count), that "
                 "start at a learning rate decay_factor times lower than the epoch before: [5, 10] trains epochs "
                 "1-4 at the base rates, 5-9 at x0.1 and 10 onward at x0.01.",
        release=[5, 10], changes="another list decays both learning rates at other epochs; the release decays them "
                                 "before its epochs 4 and 9 counted from 0 (lr_decay=5, max_decay_epoch=10), the "
                                 "start of epochs 5 and 10 counted from 1.")
    decay_factor: float = setting(0.1, "what each decay multiplies both learning rates by.")
    grad_accum: int = setting(1, "micro-batches accumulated per optimiser step.")
    max_grad_norm: float | None = setting(None, "clip the gradient norm to this value; None: no clipping.")

    def lr_factor(self, epoch: int) -> float:
        """What both base learning rates are multiplied by during ``epoch`` (counted from 1)."""
        if epoch < 1:
            raise ValueError(f"epochs count from 1, got {epoch}")
        return self.decay_factor ** sum(1 for e in self.decay_epochs_1based if epoch >= e)

    def learning_rates(self, epoch: int) -> tuple[float, float]:
        """(backbone, new modules) learning rate during ``epoch`` (counted from 1)."""
        factor = self.lr_factor(epoch)
        return self.backbone_lr * factor, self.new_lr * factor


@config_class
class TrainConfig(Config):
    """One training run: the model, the data, the optimiser and the run's own settings."""

    name: str = setting("run", "the run's name (logs, curves, summary).")
    model: ModelConfig = setting(factory=ModelConfig, doc="the model (offset_cir.model.config.ModelConfig).")
    data: DataConfig = setting(factory=DataConfig, doc="the benchmark.")
    optim: OptimConfig = setting(factory=OptimConfig, doc="the optimiser and its schedule.")
    batch_size: int = setting(16, "triplets per batch and process; the global batch is batch_size x world size.")
    keep_partial_batch: bool = setting(
        False, "train on the last, smaller batch of an epoch too (under torchrun cut to a multiple of the "
               "process count, so every process gets as many); false: every epoch is whole global batches only.",
        release=True, changes="false leaves the n % batch_size triplets an epoch's permutation puts last out of "
                              "that epoch (Shoes: 14 of 8990).")
    epochs: int = setting(100, "epochs at most.")
    max_steps: int | None = setting(None, "optimiser steps at most; None: no limit.")
    time_budget_minutes: float | None = setting(None, "minutes of training at most (over every resume); None: no "
                                                "limit.")
    eval_every_epochs: int = setting(1, "evaluate after every N epochs; 0: never at an epoch's end.")
    eval_every_steps: int | None = setting(None, "evaluate every N steps too; None: never mid-epoch.")
    eval_batch_size: int = setting(64, "batch size of the evaluations during training.")
    early_stop_patience: int | None = setting(
        4, "stop after this many evaluations in a row without a better selection score (a tie is no improvement: "
           "the earlier evaluation stays the best); None: never.",
        release=4, changes="the release (tolerance_epoch=5) trains one more epoch after the fourth evaluation "
                           "without improvement and never evaluates it; offset-cir stops without it, so the "
                           "selected epoch and best/ are the release's and last/ holds one epoch fewer.")
    selection: list[str] = setting([], "result keys summed into the selection score; empty: the protocol's rule.")
    save_best: bool = setting(
        True, "write best/ (the model of the best evaluation) whenever the selection score improves.",
        release=PerDataset(cirr=True, fashioniq=False, shoes=False, fashion200k=False),
        changes="false writes no best/ (best_result.json still records the best result); nothing else changes: "
                "the release saves CIRR's best model, Shoes' only with its --ifSave flag, FashionIQ's never (its "
                "best score is updated before the comparison that would save it).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = setting(
        "auto", "auto (fp16 autocast with a grad scaler on CUDA, fp32 on the CPU), fp32, bf16 (autocast) or fp16 "
                "(autocast with a grad scaler; CUDA only).",
        release="auto", changes="the release trains under fp16 autocast with a grad scaler on CUDA, as auto and "
                                "fp16 do there; fp32 and bf16 train in another precision.")
    loss_precision: Literal["autocast", "fp32"] = setting(
        "fp32", "the precision of the losses' similarity matrices: fp32, or autocast (the training precision's "
                "autocast: fp16 on CUDA with precision auto).",
        release="autocast", changes="fp32 computes the similarity matrices of both losses in fp32; the release "
                                    "computes them under fp16 autocast.")
    device: str = setting("auto", "auto, cpu, cuda, cuda:1 ... (a machine setting).")
    seed: int = setting(42, "seed of the model's initialisation, the data order and every random crop.")
    out_dir: str = setting("runs/train", "the run's folder.")
    save_every_steps: int | None = setting(None, "also save last/ every N steps; None: at each epoch's end only.")
    gather_features: bool = setting(True, "under torchrun, the in-batch negatives span the global batch.")
    log_every_steps: int = setting(10, "a training row in metrics.jsonl every N steps.")
    tensorboard: bool = setting(True, "log to RUN_DIR/tensorboard (needs the train extra).")
    freeze_backbone: bool = setting(
        False, "no backbone gradient, except its new projections and the last trainable_*_blocks.", release=False,
        changes="true trains the new modules (and the last blocks named) only; the release fine-tunes the whole "
                "backbone.")
    trainable_image_blocks: int = setting(0, "with freeze_backbone: the image tower's last N blocks (and its head) "
                                             "train.")
    trainable_text_blocks: int = setting(0, "with freeze_backbone: the text tower's last N blocks train.")
    feature_cache: str | None = setting(
        None, "a folder: the frozen backbone's outputs are cached there (evaluation transform only).", release=None,
        changes="a folder trains on the evaluation transform of every image and mask: no random crops.")


#: the base that carries the release's recipe: read through ``base:``, not listed as a preset
RECIPE_BASE = "release"
#: the machine settings of a config whose chain names no ``machine:``
DEFAULT_MACHINE = "default"
#: what a machine file may set (top-level keys, and the keys of its ``data:``)
MACHINE_KEYS = ("base", "device", "data", "data_roots")
MACHINE_DATA_KEYS = ("num_workers",)


def _names(folder) -> list[str]:
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def preset_names() -> dict[str, list[str]]:
    """The packaged ``presets``, ``experiments`` and ``machines`` by name."""
    root = resources.files("offset_cir") / "configs"
    return {
        "presets": [n for n in _names(root) if n != RECIPE_BASE],
        "experiments": _names(root / "experiment"),
        "machines": _names(root / "machine"),
    }


def _read_yaml(name_or_path: str, kind: str = "config") -> tuple[dict, str]:
    """A config (``kind="config"``: preset, experiment, the recipe base) or a machine file (``kind="machine"``) by
    packaged name or YAML path: (its mapping, where it came from for messages)."""
    path = Path(name_or_path)
    root = resources.files("offset_cir") / "configs"
    if path.suffix in (".yaml", ".yml") and path.is_file():
        text, where = path.read_text(), str(path)
    else:
        folders = (root / "machine",) if kind == "machine" else (root, root / "experiment")
        for candidate in (folder / f"{name_or_path}.yaml" for folder in folders):
            if candidate.is_file():
                text, where = candidate.read_text(), f"{'machine' if kind == 'machine' else 'preset'} {name_or_path}"
                break
        else:
            names = preset_names()
            if kind == "machine":
                raise UserInputError(f"machine {name_or_path!r}: not a YAML file and not a packaged machine; "
                                     f"machines: {names['machines']}")
            raise UserInputError(
                f"config {name_or_path!r}: not a YAML file and not a preset; presets: {names['presets']}, "
                f"experiments: {names['experiments']}"
            )
    try:
        data = load_yaml(text) or {}
    except yaml.YAMLError as exc:
        raise UserInputError(f"{where}: invalid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise UserInputError(f"{where}: expected a mapping at the top level")
    return data, where


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _resolve_yaml(name_or_path: str, seen: tuple = (), kind: str = "config") -> dict:
    data, where = _read_yaml(name_or_path, kind)
    if kind == "machine":
        _check_machine(data, where)
    base = data.pop("base", None)
    if base:
        if base in seen:
            raise UserInputError(f"{where}: circular 'base: {base}'")
        data = _merge(_resolve_yaml(base, seen + (name_or_path,), kind), data)
    return data


def _check_machine(data: dict, where: str) -> None:
    """A machine file sets machine settings only (``MACHINE_KEYS``): the experiment's keys stay in configs."""
    unknown = sorted(set(data) - set(MACHINE_KEYS))
    data_part = data.get("data", {})
    if not isinstance(data_part, dict):
        raise UserInputError(f"{where}: data: expected a mapping, got {data_part!r}")
    unknown += sorted(f"data.{k}" for k in set(data_part) - set(MACHINE_DATA_KEYS))
    if unknown:
        raise UserInputError(f"{where}: {unknown} are not machine settings; a machine file sets "
                             f"{', '.join(k for k in MACHINE_KEYS if k != 'data')} and data.num_workers only "
                             "(put the others into the experiment's config)")
    roots = data.get("data_roots", {})
    if not isinstance(roots, dict) or not all(isinstance(v, str) for v in roots.values()):
        raise UserInputError(f"{where}: data_roots: expected a mapping of dataset name to folder, got {roots!r}")


def _with_machine(data: dict, machine: str) -> dict:
    """``data`` (a resolved config) on top of the machine's settings; ``data.root`` from the machine's
    ``data_roots`` when the config sets none."""
    settings = _resolve_yaml(str(machine), kind="machine")
    roots = settings.pop("data_roots", None) or {}
    out = _merge(settings, data)
    part = out.get("data")
    if roots and isinstance(part, dict) and "root" not in part:
        dataset = part.get("dataset", DataConfig.dataset)
        if dataset in roots:
            out["data"] = {**part, "root": roots[dataset]}
    return out


def merge_overrides(data: dict, overrides: list[str]) -> dict:
    """A config mapping with ``key=value`` overrides applied on top (``parse_overrides``)."""
    return _merge(data, parse_overrides(overrides))


def flat_keys(data: dict, prefix: str = "") -> list[str]:
    """The dotted keys of a nested mapping's leaves (``{"optim": {"eps": 1}}`` -> ``["optim.eps"]``)."""
    return [k for key, value in data.items()
            for k in (flat_keys(value, f"{prefix}{key}.") if isinstance(value, dict) and value else [prefix + key])]


def load_config(name_or_path: str, overrides: list[str] | None = None) -> TrainConfig:
    """A TrainConfig from a preset name, an experiment name or a YAML file, with ``key=value`` overrides, on top
    of the settings of the machine it names (``machine:``; see the module docstring)."""
    if name_or_path == RECIPE_BASE:
        raise UserInputError(f"--config {RECIPE_BASE}: the release's recipe is the base of the presets, not a run of "
                             f"its own (it names no dataset); presets: {', '.join(preset_names()['presets'])}")
    data = merge_overrides(_resolve_yaml(name_or_path), overrides or [])
    data.pop("demo", None)  # a demo preset's own section (offset_cir.demo): not a training setting
    machine = data.pop("machine", None)
    if machine is not None and not isinstance(machine, str):
        raise UserInputError(f"machine: expected the name of a machine file or a YAML path, got {machine!r}")
    data = _with_machine(data, machine or DEFAULT_MACHINE)
    ablations = (data.get("model") or {}).pop("ablate", None) if isinstance(data.get("model"), dict) else None
    where = f"config {name_or_path}" + (" with the overrides" if overrides else "")
    cfg = TrainConfig.from_dict(data, source=where)
    if ablations:
        cfg.model = cfg.model.with_ablation(*([ablations] if isinstance(ablations, str) else ablations))
    return cfg


def to_yaml(data: dict) -> str:
    """A config dict as YAML, keys in their order (tuples written as lists): a run's ``config.yaml``."""
    return yaml.safe_dump(json.loads(json.dumps(data)), sort_keys=False)
