"""Training configuration: typed dataclasses, YAML presets (``offset_cir/configs``) and ``key=value`` overrides.

Three kinds of YAML file, each a mapping that may start from another with ``base: NAME`` (merged key by key):

- ``configs/release.yaml``: the release's training recipe (SPEC section 5: ViT-H-14, AdamW, learning rates and
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

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from offset_cir.errors import UserInputError
from offset_cir.model.config import ModelConfig, upgrade_field_names


@dataclass
class DataConfig:
    dataset: str = "synthetic"
    root: str = "data/synthetic"
    train_split: str = "train"
    val_split: str = "val"
    protocol: str | None = None  # evaluation protocol during training (None: the dataset's default)
    num_workers: int = 0
    settings: dict[str, Any] = field(default_factory=dict)  # passed to offset_cir.data.get_dataset


@dataclass
class OptimConfig:
    backbone_lr: float = 1e-5
    new_lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    decay_epochs: list[int] = field(default_factory=lambda: [5, 10])  # x decay_factor at the start of these epochs
    decay_factor: float = 0.1
    grad_accum: int = 1
    max_grad_norm: float | None = None


@dataclass
class TrainConfig:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 16  # per process; the global batch is batch_size x world size
    epochs: int = 100
    max_steps: int | None = None
    time_budget_minutes: float | None = None
    eval_every_epochs: int = 1
    eval_every_steps: int | None = None
    eval_batch_size: int = 64
    early_stop_patience: int | None = 5  # evaluations without improvement
    selection: list[str] = field(default_factory=list)  # result keys summed into the selection score
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (fp16 only on CUDA, with a grad scaler)
    device: str = "auto"
    seed: int = 42
    out_dir: str = "runs/train"
    save_every_steps: int | None = None
    gather_features: bool = True  # in-batch negatives span the global batch under torchrun
    log_every_steps: int = 10
    tensorboard: bool = True
    # Small compute (offset_cir.train.freeze, offset_cir.train.cache)
    freeze_backbone: bool = False  # no backbone gradient, except its new projections and the last blocks below
    trainable_image_blocks: int = 0  # with freeze_backbone: the image tower's last N blocks (and its head) train
    trainable_text_blocks: int = 0  # with freeze_backbone: the text tower's last N blocks train
    feature_cache: str | None = None  # a folder: the frozen backbone's outputs are cached there (no random crops)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
        data = yaml.safe_load(text) or {}
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


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserInputError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserInputError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserInputError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UserInputError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserInputError(f"{key}: expected a list, got {value!r}")
        inner = typing.get_args(tp)[0] if typing.get_args(tp) else Any
        items = [_coerce(v, inner, key) if inner is not Any else v for v in value]
        return tuple(items) if origin is tuple else items
    return value


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise UserInputError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    if cls is ModelConfig:  # a config.yaml or preset written with the old switch names reads as the new ones
        try:
            data = upgrade_field_names(data)
        except ValueError as exc:
            raise UserInputError(f"{prefix or 'config'}: {exc}") from exc
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise UserInputError(f"unknown config keys {[prefix + k for k in unknown]}; known: {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise UserInputError(f"{prefix or 'config'}: {exc}") from exc


def parse_overrides(overrides: list[str]) -> dict:
    """``["model.backbone=tiny", "batch_size=8"]`` -> nested dict; values parsed as YAML scalars/lists."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise UserInputError(f"override {item!r}: expected key=value (e.g. model.backbone=tiny)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def load_config(name_or_path: str, overrides: list[str] | None = None) -> TrainConfig:
    """A TrainConfig from a preset name, an experiment name or a YAML file, with ``key=value`` overrides, on top
    of the settings of the machine it names (``machine:``; see the module docstring)."""
    if name_or_path == RECIPE_BASE:
        raise UserInputError(f"--config {RECIPE_BASE}: the release's recipe is the base of the presets, not a run of "
                             f"its own (it names no dataset); presets: {', '.join(preset_names()['presets'])}")
    data = _merge(_resolve_yaml(name_or_path), parse_overrides(overrides or []))
    data.pop("demo", None)  # a demo preset's own section (offset_cir.demo): not a training setting
    machine = data.pop("machine", None)
    if machine is not None and not isinstance(machine, str):
        raise UserInputError(f"machine: expected the name of a machine file or a YAML path, got {machine!r}")
    data = _with_machine(data, machine or DEFAULT_MACHINE)
    ablations = (data.get("model") or {}).pop("ablate", None) if isinstance(data.get("model"), dict) else None
    cfg = _build(TrainConfig, data)
    if ablations:
        cfg.model = cfg.model.with_ablation(*([ablations] if isinstance(ablations, str) else ablations))
    return cfg


def config_from_dict(data: dict) -> TrainConfig:
    """A TrainConfig from a resolved dict (``TrainConfig.to_dict()``, a run's saved config): no presets, no
    machine file."""
    return _build(TrainConfig, data)


def to_yaml(data: dict) -> str:
    """A config dict as YAML, keys in their order (tuples written as lists): a run's ``config.yaml``."""
    return yaml.safe_dump(json.loads(json.dumps(data)), sort_keys=False)
