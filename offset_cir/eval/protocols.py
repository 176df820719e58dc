"""The table of evaluation protocols (docs/model.md#evaluation): ``register_protocol``, ``list_protocols``, ``get_protocol``.

A protocol is one entry of this table, a :class:`Protocol`: which benchmark and split it scores, which galleries
are ranked, which metrics are reported and how a checkpoint is selected by them. Its name is stamped into every
result :func:`offset_cir.evaluate` returns. Another protocol is added with ``register_protocol(Protocol(...))``.

- ``fashioniq``: val, per category R@10/R@50 and their averages, galleries ``union`` and ``full``
  (``fashioniq-union`` / ``fashioniq-full``: one of them);
- ``shoes``: eval triplets, gallery the eval images, R@1/10/50 and mean;
- ``cirr-val`` (alias ``cirr``): R@1/5/10/50, R_subset@1/2/3 and (R@5+R_subset@1)/2;
- ``synthetic``: the CIRR metrics on the synthetic benchmark (test split), plus ``unseen_*`` metrics over the
  unseen-pair queries the benchmark lists;
- ``fashion200k-tirg`` (alias ``fashion200k``): R@1/10/50, a hit when the description equals the target's;
- ``circo-val`` (alias ``circo``): mAP@5/10/25/50 over every ground truth, R@5/10/25/50 of the target alone and
  mAP@10 per semantic aspect, the whole gallery ranked with the reference in it, as the benchmark's own evaluation
  does; ``circo-val-noref`` the same with the reference excluded from its own ranking.
"""
from __future__ import annotations

from dataclasses import dataclass

from offset_cir.errors import UserInputError

METRIC_FAMILIES = ("recall", "map")


@dataclass(frozen=True)
class Protocol:
    """One evaluation protocol; ``name`` is stamped into its results."""

    name: str
    datasets: tuple[str, ...]  # the benchmarks it fits; the first is the one it is made for
    split: str
    galleries: tuple[str, ...]
    ks: tuple[int, ...]
    subset_ks: tuple[int, ...] = ()
    per_unit: bool = False  # FashionIQ: metrics per category, then averaged
    query_transform: str = "eval"  # docs/model.md#a2: the release uses the training transform for FashionIQ queries
    description: str = ""
    # The checkpoint-selection rule (docs/model.md#training): the R@K summed into ``selection_score`` (over the categories
    # when per_unit, plus every R_subset@K when subset_ks); None: every K of ks. With metric "map": the mAP@K.
    selection_ks: tuple[int, ...] | None = None
    # Whether a query's reference is removed from its own ranking (docs/model.md#evaluation); CIRCO's own evaluation keeps it.
    exclude_reference: bool = True
    # "recall": R@K of the first positive; "map": CIRCO's mAP@K over every ground truth, R@K of the target, and
    # mAP@<aspect_k> per semantic aspect.
    metric: str = "recall"
    aspect_k: int = 10

    def __post_init__(self):
        if self.metric not in METRIC_FAMILIES:
            raise ValueError(f"protocol {self.name}: metric must be one of {METRIC_FAMILIES}, got {self.metric!r}")


PROTOCOLS: dict[str, Protocol] = {}
ALIASES: dict[str, str] = {}


def register_protocol(protocol: Protocol, aliases: tuple[str, ...] = ()) -> Protocol:
    """Add ``protocol`` (and other names for it) to the table; a name already taken is refused."""
    for name in (protocol.name, *aliases):
        if name in PROTOCOLS or name in ALIASES:
            raise ValueError(f"protocol name {name!r} is already registered")
    PROTOCOLS[protocol.name] = protocol
    ALIASES.update(dict.fromkeys(aliases, protocol.name))
    return protocol


def list_protocols() -> list[str]:
    """Every registered protocol name (aliases not included), in registration order."""
    return list(PROTOCOLS)


def get_protocol(name: str) -> Protocol:
    """The protocol registered as ``name`` (or an alias of it)."""
    key = ALIASES.get(name, name)
    if key not in PROTOCOLS:
        raise UserInputError(f"unknown protocol {name!r}; choose from {', '.join(sorted(PROTOCOLS) + sorted(ALIASES))}")
    return PROTOCOLS[key]


def protocol_for(name: str | None, bench) -> Protocol:
    """Resolve a protocol name (None: the benchmark's default) and check that it fits the benchmark."""
    proto = get_protocol(name or bench.default_protocol)
    if bench.name not in proto.datasets:
        raise UserInputError(f"protocol {proto.name} is for {' or '.join(proto.datasets)}, not {bench.name}")
    return proto


def protocol_splits(bench) -> dict[str, list[str]]:
    """split -> the protocols made for ``bench``'s benchmark that evaluate on it (what ``offset doctor`` needs)."""
    out: dict[str, list[str]] = {}
    for proto in PROTOCOLS.values():
        if proto.datasets and proto.datasets[0] == bench.name:
            out.setdefault(bench.split_aliases.get(proto.split, proto.split), []).append(proto.name)
    return out


for _p, _aliases in [
    (Protocol("fashioniq", ("fashioniq",), "val", ("union", "full"), (10, 50), per_unit=True, query_transform="train",
              selection_ks=(10,),
              description="FashionIQ val, per category R@10/R@50 and averages; galleries union and full"), ()),
    (Protocol("fashioniq-union", ("fashioniq",), "val", ("union",), (10, 50), per_unit=True, query_transform="train",
              selection_ks=(10,), description="FashionIQ val, gallery union (reference and target images of the "
                                              "category's val triplets)"), ()),
    (Protocol("fashioniq-full", ("fashioniq",), "val", ("full",), (10, 50), per_unit=True, query_transform="train",
              selection_ks=(10,),
              description="FashionIQ val, gallery full (every image of split.<cat>.val.json)"), ()),
    (Protocol("shoes", ("shoes",), "eval", ("all",), (1, 10, 50), selection_ks=(10, 50),
              description="Shoes eval triplets, gallery the eval images; R@1/10/50 and mean"), ("shoes-eval",)),
    (Protocol("cirr-val", ("cirr", "synthetic"), "val", ("all",), (1, 5, 10, 50), (1, 2, 3),
              description="CIRR val, gallery all val images; R@K, R_subset@K over set members minus the reference"),
     ("cirr",)),
    (Protocol("synthetic", ("synthetic", "cirr"), "test", ("all",), (1, 5, 10, 50), (1, 2, 3),
              description="synthetic benchmark (CIRR layout and metrics), with unseen-pair metrics"), ()),
    (Protocol("fashion200k-tirg", ("fashion200k",), "test", ("all",), (1, 10, 50),
              description="Fashion200K test (TIRG): a hit when the retrieved image's description equals the "
                          "target's"), ("fashion200k",)),
    (Protocol("circo-val", ("circo",), "val", ("all",), (5, 10, 25, 50), exclude_reference=False, metric="map",
              description="CIRCO val, the whole gallery ranked (reference included, as the benchmark's evaluation); "
                          "mAP@K over all ground truths, R@K of the target, mAP@10 per semantic aspect"), ("circo",)),
    (Protocol("circo-val-noref", ("circo",), "val", ("all",), (5, 10, 25, 50), metric="map",
              description="CIRCO val as circo-val, with the reference excluded from its own ranking"), ()),
]:
    register_protocol(_p, _aliases)
