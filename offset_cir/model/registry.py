"""The backbone registry: every backbone name the package builds itself, in the manner of timm's model registry.

An entry (:class:`BackboneEntry`) says what a name is: its tower family as ``offset info`` lists it, one line on
what it is, whether its pretrained weights install offline (with pip, no model hub), the factory that builds it,
its tokenizer factory, and its own settings (an OpenCLIP-schema config for a package configuration, a
``PackagedSpec`` for a packaged backbone). :func:`register_backbone` adds one (a decorator on the factory);
:func:`is_registered`, :func:`get_backbone_entry` and :func:`list_backbones` read them.

OpenCLIP's model names are not entries: they resolve through ``open_clip`` itself. :func:`backbone_family` decides
from an OpenCLIP config alone (nothing is built) whether this version builds it, and
``list_backbones(open_clip=True)`` adds the OpenCLIP names it does. The modules that register the package's own
backbones (:data:`BUILTIN_MODULES`) are imported on the first look-up, as timm imports its model modules.
"""
from __future__ import annotations

import dataclasses
import importlib
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from offset_cir.errors import UserInputError

# Modules whose import registers the package's own backbones (package configurations, packaged backbones).
BUILTIN_MODULES = ("offset_cir.model.towers", "offset_cir.model.packaged")
# timm pooling heads that need the full feature map (a fixed positional grid): W_proj of one token is undefined.
UNSUPPORTED_TIMM_POOLS = ("abs_attn", "rot_attn")


@dataclass(frozen=True)
class BackboneEntry:
    """One registered backbone name."""

    name: str
    family: str  # the tower family, as `offset info` lists it
    summary: str  # what it is, in one line
    create: Callable[[str, str | None], Any]  # (name, pretrained or None for random init) -> an OpenCLIP-style CLIP
    tokenizer: Callable[[str, int], Any] | None = None  # (name, context_length) -> tokenizer; None: OpenCLIP's BPE
    offline_weights: bool = False  # its pretrained weights install with pip (no model hub needed)
    config: Any = None  # the entry's own settings, read by its factory


_ENTRIES: dict[str, BackboneEntry] = {}
_builtins_loaded = False


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in BUILTIN_MODULES:
            importlib.import_module(module)


def register_backbone(name: str, *, family: str, summary: str, offline_weights: bool = False,
                      tokenizer: Callable[[str, int], Any] | None = None, config: Any = None,
                      replace: bool = False) -> Callable:
    """Decorator: register the factory ``create(name, pretrained)`` under ``name`` and return it unchanged.

    A name registered already is refused unless ``replace`` (then the new entry takes its place)."""

    def decorate(create: Callable) -> Callable:
        if name in _ENTRIES and not replace:
            raise UserInputError(f"backbone {name!r} is registered already ({_ENTRIES[name].family})")
        _ENTRIES[name] = BackboneEntry(name, family, summary, create, tokenizer, bool(offline_weights), config)
        return create

    return decorate


def unregister_backbone(name: str) -> None:
    """Remove ``name`` from the registry (a KeyError when it is not there)."""
    del _ENTRIES[name]


def is_registered(name: str) -> bool:
    """Whether ``name`` is one of the package's own (or a user-registered) backbones, not an OpenCLIP name."""
    _load_builtins()
    return name in _ENTRIES


def get_backbone_entry(name: str) -> BackboneEntry:
    """The entry of a registered name; a UserInputError listing the registered names otherwise."""
    _load_builtins()
    if name not in _ENTRIES:
        raise UserInputError(f"backbone {name!r} is not registered; registered: {', '.join(sorted(_ENTRIES))} "
                             "(OpenCLIP names resolve through open_clip: see `offset info`)")
    return _ENTRIES[name]


def list_backbones(open_clip: bool = False) -> list[str]:
    """The registered names, sorted; with ``open_clip=True`` followed by every OpenCLIP model name this version
    builds (in OpenCLIP's order)."""
    _load_builtins()
    names = sorted(_ENTRIES)
    if open_clip:
        import open_clip as oc

        names += [m for m in oc.list_models() if m not in _ENTRIES and backbone_family(m) is not None]
    return names


class RegisteredConfigs(MutableMapping):
    """The settings of the entries one factory builds, as a dict ``name -> config``: reading one reads its entry;
    setting one replaces that entry's config (or registers a new entry with this factory and ``defaults``);
    deleting one unregisters it."""

    def __init__(self, create: Callable, **defaults: Any):
        self.create, self.defaults = create, defaults

    def _entry(self, name: str) -> BackboneEntry:
        entry = _ENTRIES.get(name)
        if entry is None or entry.create is not self.create:
            raise KeyError(name)
        return entry

    def __getitem__(self, name: str) -> Any:
        return self._entry(name).config

    def __setitem__(self, name: str, config: Any) -> None:
        if name in self:
            _ENTRIES[name] = dataclasses.replace(self._entry(name), config=config)
        else:
            register_backbone(name, config=config, **self.defaults)(self.create)

    def __delitem__(self, name: str) -> None:
        self._entry(name)
        unregister_backbone(name)

    def __iter__(self) -> Iterator[str]:
        return iter([name for name, entry in _ENTRIES.items() if entry.create is self.create])

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"RegisteredConfigs({sorted(self)})"


# ------------------------------------------------------------------ OpenCLIP names
def _timm_family(timm_name: str) -> str:
    n = timm_name.lower()
    for key, fam in (("siglip", "SigLIP"), ("eva", "EVA"), ("pe_core", "Perception Encoder"),
                     ("mci", "MobileCLIP"), ("convnext", "ConvNeXt"), ("vitamin", "ViTamin"), ("swin", "Swin"),
                     ("efficientnet", "EfficientNet")):
        if key in n:
            return fam
    return "ViT" if n.startswith("vit") else n.split("_")[0]


def _vision_family(vision: dict) -> str | None:
    """The family of an OpenCLIP vision config, or None for one this version cannot build."""
    if "timm_model_name" in vision:
        try:
            import timm
        except ImportError:
            return None
        if not timm.is_model(vision["timm_model_name"]) or vision.get("timm_pool") in UNSUPPORTED_TIMM_POOLS:
            return None
        return f"timm {_timm_family(vision['timm_model_name'])}"
    if isinstance(vision.get("layers"), int):
        if isinstance(vision.get("attentional_pool"), str):
            return None  # OpenCLIP's untested parallel/cascade pooler
        if vision.get("attentional_pool"):
            return "OpenCLIP ViT, attention-pooled"
        return "OpenCLIP ViT, pool-then-norm" if vision.get("final_ln_after_pool") else "OpenCLIP ViT"
    if isinstance(vision.get("layers"), (list, tuple)):
        return "OpenCLIP ModifiedResNet"
    return None


def backbone_family(name: str) -> str | None:
    """The family of a backbone name as this version builds it: a registered entry's own, else read from its
    OpenCLIP config alone (no model is built); None for a name this version cannot build."""
    _load_builtins()
    if name in _ENTRIES:
        return _ENTRIES[name].family
    import open_clip

    cfg = open_clip.get_model_config(name)
    if not cfg:
        return None
    fam = _vision_family(cfg.get("vision_cfg", {}))
    if fam is None:
        return None
    if "multimodal_cfg" in cfg and fam.startswith("OpenCLIP ViT"):
        fam += " (CoCa: contrastive towers only)"
    text = cfg.get("text_cfg", {})
    if "hf_model_name" in text:
        fam += " + HF text"
        if not Path(text["hf_model_name"]).is_dir():
            fam += " (its config comes from the Hugging Face hub or its cache)"
    return fam
