"""Typed configuration dataclasses: one base for declaring, reading, checking and writing them.

``ModelConfig`` (:mod:`offset_cir.model.config`), ``TrainConfig`` and its parts (:mod:`offset_cir.train.config`)
and the model config saved in a checkpoint, an export or a run folder all go through it:

- :func:`config_class` makes a plain dataclass whose docstring lists every field with what it means, read from
  each field's :func:`setting` (one text per field, shown by ``help()`` and by ``offset info --deviations``);
- :func:`setting` declares a field: its default, what it means and, where offset-cir can depart from the authors'
  release, the release's value and what another value changes;
- :meth:`Config.to_dict` gives JSON values; :meth:`Config.from_dict` reads older field names
  (``LEGACY_NAMES``), then checks keys and types with pydantic and names the field, the type expected and the file
  in its error (:class:`ConfigError`);
- :func:`parse_overrides` reads ``key=value`` items (``offset train``, ``offset demo``, ``--set``), values as YAML.

It lives on the package's lowest floor (beside ``errors.py`` and ``io.py``) so that ``model/`` and ``train/`` both
use it while ``model/`` imports nothing of ``train/``.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import yaml

from offset_cir.errors import UserInputError

log = logging.getLogger(__name__)

__all__ = ["Config", "ConfigError", "PerDataset", "Renamed", "config_class", "setting", "parse_overrides",
           "load_yaml", "type_name"]


class ConfigError(UserInputError):
    """A configuration (a file, a mapping, ``key=value`` overrides) with an unknown key or a wrong value."""


class PerDataset(dict):
    """A release value that depends on the benchmark (``{"cirr": True, "fashioniq": False}``)."""


@dataclass(frozen=True)
class Renamed:
    """An older field name: read as ``new``, its value passed through ``convert`` (a converted
    value is logged with ``why``)."""

    new: str
    convert: Callable[[Any], Any] | None = None
    why: str = ""


def setting(default: Any = dataclasses.MISSING, doc: str = "", *, release: Any = dataclasses.MISSING,
            changes: str = "", factory: Callable[[], Any] | None = None):
    """A config field: its default (a list or dict default is copied for each instance), what it means and, for a
    setting where offset-cir can depart from the authors' release, ``release`` (the release's value, or a
    :class:`PerDataset`) and ``changes`` (what a value other than the release's changes)."""
    if not doc:
        raise TypeError("setting(): every config field says what it means (doc=...)")
    if release is not dataclasses.MISSING and not changes:
        raise TypeError("setting(): a field with the release's value says what another value changes (changes=...)")
    meta = {"doc": doc, **({"release": release, "changes": changes} if release is not dataclasses.MISSING else {})}
    if factory is None and isinstance(default, (list, dict)):
        factory, default = functools.partial(copy.deepcopy, default), dataclasses.MISSING
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


_PLURAL = {str: "strings", int: "integers", float: "numbers", bool: "true/false values"}


def type_name(tp) -> str:
    """An annotation in words: ``int | None`` -> "an integer or null"."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple):
        inner = [a for a in args if a is not Ellipsis] or [Any]
        count = f"{len(args)} " if origin is tuple and Ellipsis not in args else ""
        return f"a list of {count}{_PLURAL.get(inner[0], type_name(inner[0]))}"
    if origin is dict or tp is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} fields"
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "a string",
            Any: "any value"}.get(tp, getattr(tp, "__name__", str(tp)))


@functools.cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def _adapter(cls):
    import pydantic

    return pydantic.TypeAdapter(cls)


def _choices(tp) -> tuple | None:
    """The values a ``Literal[...]`` (or ``Literal[...] | None``) annotation allows; None for other types."""
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        parts = [_choices(a) if a is not type(None) else (None,) for a in typing.get_args(tp)]
        return None if any(p is None for p in parts) else tuple(v for p in parts for v in p)
    return None


def _config_fields(cls) -> dict[str, type]:
    """The fields of ``cls`` that are configs themselves (nested sections)."""
    return {f.name: _hints(cls)[f.name] for f in dataclasses.fields(cls)
            if isinstance(_hints(cls)[f.name], type) and issubclass(_hints(cls)[f.name], Config)}


class Config:
    """Base of the config dataclasses (decorate each with :func:`config_class`)."""

    #: older field names: old name -> new name, or :class:`Renamed` (new name and a value converter)
    LEGACY_NAMES: ClassVar[dict[str, str | Renamed]] = {}

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # a field of choices holds one of them, however the config was built
            allowed = _choices(_hints(type(self))[f.name])
            if allowed is not None and getattr(self, f.name) not in allowed:
                raise ConfigError(f"{type(self).__name__}.{f.name}={getattr(self, f.name)!r}: expected "
                                  f"{type_name(_hints(type(self))[f.name])}")

    def to_dict(self) -> dict[str, Any]:
        """Every field (nested sections too) as JSON values: what config.json, config.yaml and results hold."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def upgrade(cls, data: Any, where: str = "") -> Any:
        """A copy of ``data`` with older field names (``LEGACY_NAMES``, nested sections too)
        replaced by the current ones. Both an old name and its new one in one mapping is refused."""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for old, rule in cls.LEGACY_NAMES.items():
            rule = Renamed(rule) if isinstance(rule, str) else rule
            if old in out:
                if rule.new in out:
                    raise ConfigError(f"{where or cls.__name__}: both {old!r} (the old name) and {rule.new!r} are "
                                      f"given; keep only {rule.new!r}")
                value = out.pop(old)
                out[rule.new] = rule.convert(value) if rule.convert is not None else value
                if out[rule.new] != value:
                    log.warning("%s: %s=%s is read as %s=%s (%s)", where or cls.__name__, old, json.dumps(value),
                                rule.new, json.dumps(out[rule.new]), rule.why)
        for name, section in _config_fields(cls).items():
            if name in out:
                out[name] = section.upgrade(out[name], f"{where or cls.__name__}: {name}")
        return out

    @classmethod
    def from_dict(cls, data: Any, source: str = "", key: str = ""):
        """A config from a mapping (its ``to_dict`` form, a YAML file, a saved config): older field names
        read as the current ones, then keys and types checked. ``source`` (the file) and ``key`` (where the mapping
        sits in it, e.g. ``model``) are named in the :class:`ConfigError` of a bad key or value."""
        import pydantic

        where = source or cls.__name__
        data = cls.upgrade(data, where)
        try:
            return _adapter(cls).validate_json(json.dumps(data, default=str), strict=True)
        except pydantic.ValidationError as exc:
            raise ConfigError(_describe(cls, exc, data, where, key)) from None

    @classmethod
    def field_docs(cls) -> dict[str, str]:
        """Each field's text (nested sections with dotted names)."""
        out = {}
        for f in dataclasses.fields(cls):
            out[f.name] = f.metadata.get("doc", "")
            section = _config_fields(cls).get(f.name)
            if section is not None:
                out.update({f"{f.name}.{k}": v for k, v in section.field_docs().items()})
        return out


def _describe(cls, exc, data: Any, where: str, key: str) -> str:
    """A pydantic error in a person's words: the field's dotted name, its value, the type expected, the file."""
    unknown, problems = [], []
    for err in exc.errors():
        path, tp = _walk(cls, err["loc"])
        name = ".".join(([key] if key else []) + path)
        if tp is None and path:
            unknown.append((name, path))
        elif err["type"] == "value_error":  # a __post_init__ check: its message says what is wrong
            msg = str(err.get("ctx", {}).get("error", err["msg"]))
            problems.append(f"{name}: {msg}" if name else msg)
        else:
            value = functools.reduce(lambda d, k: d.get(k) if isinstance(d, dict) else None, path, data)
            problems.append(f"field {name} is {json.dumps(value, default=str)[:200]} ({type(value).__name__}); "
                            f"expected {type_name(tp)}")
    if unknown:
        section = functools.reduce(lambda c, k: _config_fields(c).get(k, c), unknown[0][1][:-1], cls)
        problems.insert(0, f"unknown config keys {sorted(n for n, _ in unknown)}; known: "
                           f"{sorted(f.name for f in dataclasses.fields(section))}")
    return f"{where}: " + "; ".join(dict.fromkeys(problems))


def _walk(cls, loc: tuple) -> tuple[list[str], Any]:
    """(the field names along ``loc``, the annotation of the innermost field; None for an unknown key)."""
    path: list[str] = []
    tp: Any = None
    current = cls
    for part in loc:
        if current is None or not isinstance(part, str):
            break  # inside a field's value (a list's element): the field is what is named
        path.append(part)
        if part not in _hints(current):
            return path, None
        tp = _hints(current)[part]
        current = tp if isinstance(tp, type) and issubclass(tp, Config) else None
    return path, tp


def config_class(cls):
    """``@config_class``: ``cls`` as a dataclass that refuses unknown keys when read, its docstring completed with
    an ``Args:`` entry per field (type, default, meaning, and the release's value where it has one)."""
    import pydantic

    cls = dataclass(cls)
    cls.__pydantic_config__ = pydantic.ConfigDict(extra="forbid")
    lines = [(cls.__doc__ or cls.__name__).rstrip(), "", "Args:"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        shown = default.__class__.__name__ + "()" if dataclasses.is_dataclass(default) else repr(default)
        entry = f"    {f.name} ({type_name(_hints(cls)[f.name])}, default {shown}): {f.metadata.get('doc', '')}"
        if "release" in f.metadata:
            entry += f" The authors' release: {f.metadata['release']!r}; {f.metadata['changes']}"
        lines.append(entry)
    cls.__doc__ = "\n".join(lines)
    return cls


# -------------------------------------------------------------------------------------------- key=value and YAML
class _YamlLoader(yaml.SafeLoader):
    """YAML as PyYAML reads it, except that ``3e-4`` is a number (YAML 1.1 needs a dot: ``3.0e-4``)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def load_yaml(text: str) -> Any:
    """A YAML document (a config file, an override's value); ``yaml.YAMLError`` when it does not parse."""
    return yaml.load(text, Loader=_YamlLoader)


def parse_overrides(items: list[str], what: str = "override") -> dict:
    """``["model.backbone=tiny", "batch_size=8"]`` -> ``{"model": {"backbone": "tiny"}, "batch_size": 8}``: the
    value read as YAML (a number, true/false, null, a list ``[1, 2]``; anything else a string). ``what`` names
    the items in an error (``override``, ``--set``)."""
    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")  # no setting name holds a dash: batch-size=8 is batch_size=8
        if not sep or not key:
            raise ConfigError(f"{what} {item!r}: expected key=value (e.g. batch_size=8)")
        try:
            value = load_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{what} {item!r}: {part} is set to a value and used as a section")
        node[parts[-1]] = value
    return out
