"""The synthetic cluttered-scene benchmark generator, in the CIRR layout (docs/model.md#data and #evaluation).

Each image holds one *dominant object* (shape, colour, size, pattern; random position and rotation) over a
random textured background with 3 to 8 smaller *clutter* objects drawn from the same shapes and colours, so
the paper's premise (a dominant portion plus noise, docs/model.md#overview) holds by construction. A triplet's target
changes 1 to 3 of the dominant object's attributes; background and clutter are drawn anew. The dominant
object's soft mask is written beside each image as ``<name>-segmask.png`` (docs/model.md#data, CIRR row).
Everything is a pure function of the seed (byte-identical files). The benchmark is *read* by its loader
(``get_dataset("synthetic", root)``, :class:`offset_cir.data.synthetic.benchmark.Synthetic`), CIRR's with the
unseen-pair notes.

One job per module:

- :mod:`~offset_cir.data.synthetic.vocab`: the attributes and their values;
- :mod:`~offset_cir.data.synthetic.render`: a scene's pixels and mask (and mask noise);
- :mod:`~offset_cir.data.synthetic.captions`: modification texts;
- :mod:`~offset_cir.data.synthetic.plan`: images, sets, records and held-out pairs of every split (no pixels);
- :mod:`~offset_cir.data.synthetic.generator`: :func:`generate`, which writes a benchmark folder;
- :mod:`~offset_cir.data.synthetic.meta`: ``synthetic_meta.json``, its one reader (:func:`load_meta`);
- :mod:`~offset_cir.data.synthetic.benchmark`: :class:`Synthetic`, the loader (imports torch, unlike the others).

The public names below are imported from their modules on first use (importing the package loads nothing else).
"""
from __future__ import annotations

from offset_cir._lazy import lazy_getattr

_PUBLIC = {
    "offset_cir.data.synthetic.vocab": ("SHAPES", "COLOURS", "SIZES", "PATTERNS", "ATTRIBUTES", "VOCAB"),
    "offset_cir.data.synthetic.render": ("CLUTTER_RANGE", "CLUTTER_DIAMETER", "shape_polygon", "render_image",
                                         "degrade_mask"),
    "offset_cir.data.synthetic.captions": ("make_caption",),
    "offset_cir.data.synthetic.plan": ("SPLITS", "N_CHANGES_P", "choose_heldout", "plan_benchmark"),
    "offset_cir.data.synthetic.generator": ("GENERATOR_VERSION", "DEFAULTS", "generate"),
    "offset_cir.data.synthetic.meta": ("META_NAME", "PARTIAL_MARKER", "read_meta", "load_meta", "unseen_pairids"),
    "offset_cir.data.synthetic.benchmark": ("Synthetic",),
}
_MODULE_OF = {name: module for module, names in _PUBLIC.items() for name in names}

__all__ = list(_MODULE_OF)

__getattr__ = lazy_getattr(__name__, _MODULE_OF, globals())


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
