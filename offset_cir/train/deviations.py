"""Where offset-cir can depart from the authors' release: one table, read from the config fields' own metadata.

Every field declared with a ``release`` value (:func:`offset_cir.config_base.setting`) is a row: the setting, the
release's value, the default, what another value changes, and whether the release presets (``fashioniq``,
``shoes``, ``cirr``, ``fashion200k``) reproduce the release, found by resolving them. ``offset info --deviations``
prints :func:`deviation_table`; ``docs/deviations.md`` carries the same text.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from offset_cir.config_base import Config, PerDataset
from offset_cir.train.config import RELEASE_PRESETS, TrainConfig, load_config

__all__ = ["Deviation", "deviations", "deviation_table", "marked_fields"]


@dataclass(frozen=True)
class Deviation:
    """One row: ``setting`` (dotted key), the release's value, the default, what the release presets hold where
    they differ from the release (empty: they reproduce it), and what another value changes."""

    setting: str
    release: Any
    default: Any
    presets_differ: dict[str, Any]
    changes: str

    @property
    def presets_reproduce(self) -> bool:
        return not self.presets_differ


def marked_fields(cls: type = TrainConfig, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every field of ``cls`` (nested sections with dotted names) that carries the release's value."""
    out = {}
    for f in dataclasses.fields(cls):
        if "release" in f.metadata:
            out[prefix + f.name] = f
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if isinstance(default, Config):
            out.update(marked_fields(type(default), f"{prefix}{f.name}."))
    return out


def _value(cfg, setting: str) -> Any:
    for part in setting.split("."):
        cfg = getattr(cfg, part)
    return json.loads(json.dumps(cfg))


def deviations(cls: type = TrainConfig) -> list[Deviation]:
    """The rows, in field order; ``cls`` defaults to ``TrainConfig`` (its model, data and optimiser sections
    included)."""
    default = cls()
    presets = {name: load_config(name) for name in RELEASE_PRESETS} if cls is TrainConfig else {}
    rows = []
    for setting, f in marked_fields(cls).items():
        release = f.metadata["release"]
        differ = {}
        for name, cfg in presets.items():
            wanted = release.get(cfg.data.dataset) if isinstance(release, PerDataset) else release
            value = _value(cfg, setting)
            if value != json.loads(json.dumps(wanted)):
                differ[name] = value
        rows.append(Deviation(setting, release, _value(default, setting), differ, f.metadata["changes"]))
    return rows


def _shown(value: Any) -> str:
    if isinstance(value, PerDataset):
        return "; ".join(f"{k}: {_shown(v)}" for k, v in value.items())
    return "`" + (value if isinstance(value, str) else json.dumps(value)) + "`"


def deviation_table(rows: list[Deviation] | None = None) -> str:
    """The rows as a Markdown table (what ``offset info --deviations`` prints and docs/deviations.md holds)."""
    rows = deviations() if rows is None else rows
    lines = ["| setting | the release | default | release presets reproduce it | what another value changes |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        presets = "yes" if r.presets_reproduce else "no: " + ", ".join(
            f"{name} {_shown(v)}" for name, v in r.presets_differ.items())
        lines.append(f"| `{r.setting}` | {_shown(r.release)} | {_shown(r.default)} | {presets} | {r.changes} |")
    return "\n".join(lines)
