"""What the top result has of what the text asks for: per-attribute top-1 accuracy on the synthetic benchmark.

The synthetic generator knows every image's dominant object (shape, colour, size, pattern) and every query's
requested change (``synthetic_meta.json``, read through :mod:`offset_cir.data.synthetic.meta`). A query's text
*asks for* an attribute when it names it: a changed attribute asks for the target's new value ("make it red"), a
kept one for the value it keeps ("keep it blue", the reference's value, which the target shares). For each
attribute, the table gives the share of the queries asking for it whose top-1 result has the asked value; "all" is
the share of all queries whose top-1 result has every attribute its text asks for.

Everything here is a pure function of a ranking (rows of ``evaluate(..., save_rankings=FILE)``: ``pairid`` and
``top``, the reference already excluded) and the metadata's ``queries`` and ``images``.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Callable, Iterable, Mapping

from offset_cir.errors import DatasetError

ATTRIBUTES = ("shape", "colour", "size", "pattern")
COLUMNS = (*ATTRIBUTES, "all")


def benchmark_meta(bench) -> dict | None:
    """The synthetic metadata of a loaded benchmark (``bench.meta_path``, checked by
    :func:`~offset_cir.data.synthetic.meta.read_meta`), or None for a benchmark without one (a real one)."""
    from offset_cir.data.synthetic.meta import read_meta

    path = getattr(bench, "meta_path", None)
    return read_meta(path) if path is not None and Path(path).is_file() else None


def asked_attributes(query: Mapping, images: Mapping[str, Mapping]) -> dict[str, str]:
    """The attributes the text of ``query`` (a ``queries`` entry of the metadata) names, each with the value it
    asks for: a changed attribute its new value, a kept one the reference's value."""
    asked = {attr: change[1] for attr, change in query["changes"].items()}
    reference = _image(images, query["reference"])
    for attr in query.get("kept", ()):
        asked[attr] = reference[attr]
    return asked


def attribute_hits(asked: Mapping[str, str], image: Mapping[str, str]) -> dict[str, bool]:
    """For each asked attribute, whether ``image`` (its metadata entry) has the asked value."""
    return {attr: image.get(attr) == value for attr, value in asked.items()}


def _image(images: Mapping[str, Mapping], name: str) -> Mapping:
    try:
        return images[name]
    except KeyError:
        raise DatasetError(f"image {name!r}: not in the synthetic metadata's images; expected an image of the "
                           f"benchmark the ranking was made on") from None


def top1_attribute_table(rows: Iterable[Mapping], queries: Iterable[Mapping],
                         images: Mapping[str, Mapping]) -> dict[str, dict]:
    """Per column of :data:`COLUMNS`: ``asked`` (queries whose text names it; "all": every query ranked),
    ``hits`` (those whose top-1 result has the asked value) and ``share`` (hits / asked in percent, None when
    nothing asked for it). A query ranked with an empty ``top`` counts as asked and missed."""
    by_pairid = {q["pairid"]: q for q in queries}
    asked_n = dict.fromkeys(COLUMNS, 0)
    hit_n = dict.fromkeys(COLUMNS, 0)
    for row in rows:
        query = by_pairid.get(row["pairid"])
        if query is None:
            raise DatasetError(f"ranking row of pair id {row['pairid']}: no such query in the synthetic metadata; "
                               f"expected a ranking of this benchmark")
        asked = asked_attributes(query, images)
        top = row.get("top") or []
        hits = attribute_hits(asked, _image(images, top[0])) if top else dict.fromkeys(asked, False)
        for attr, hit in hits.items():
            asked_n[attr] += 1
            hit_n[attr] += hit
        asked_n["all"] += 1
        hit_n["all"] += bool(top) and all(hits.values())
    return {c: {"asked": asked_n[c], "hits": hit_n[c],
                "share": round(100.0 * hit_n[c] / asked_n[c], 2) if asked_n[c] else None} for c in COLUMNS}


def split_table(rows: Iterable[Mapping], meta: Mapping, split: str, gallery: str | None = "all") -> dict[str, dict]:
    """:func:`top1_attribute_table` of the rows of ``gallery`` (None: every row) against the metadata ``meta``
    (:func:`offset_cir.data.synthetic.meta.read_meta`) of ``split``."""
    if split not in meta["queries"]:
        raise DatasetError(f"the synthetic metadata has no split {split!r}; expected one of {sorted(meta['queries'])}")
    picked = [r for r in rows if gallery is None or r.get("gallery") in (None, gallery)]
    return top1_attribute_table(picked, meta["queries"][split], meta["images"])


def chance_shares(meta: Mapping, split: str) -> dict[str, float | None]:
    """The shares a random top-1 result would reach: per column, the mean over the queries of ``split`` (of those
    asking for it) of the share of the split's other images (the gallery less the reference) with the asked
    value(s)."""
    from collections import Counter

    images = meta["images"]
    gallery = Counter(tuple(v.get(a) for a in ATTRIBUTES) for v in images.values() if v.get("split") == split)
    sums, asked_n = dict.fromkeys(COLUMNS, 0.0), dict.fromkeys(COLUMNS, 0)
    for query in meta["queries"].get(split, []):
        asked = asked_attributes(query, images)
        reference = tuple(images[query["reference"]].get(a) for a in ATTRIBUTES)
        size = sum(gallery.values()) - 1
        for column, wanted in [*((a, {a: v}) for a, v in asked.items()), ("all", asked)]:
            idx = [ATTRIBUTES.index(a) for a in wanted]
            match = sum(n for key, n in gallery.items() if all(key[i] == wanted[a] for i, a in zip(idx, wanted)))
            match -= all(reference[i] == wanted[a] for i, a in zip(idx, wanted))
            sums[column] += match / max(size, 1)
            asked_n[column] += 1
    return {c: round(100.0 * sums[c] / asked_n[c], 2) if asked_n[c] else None for c in COLUMNS}


def shares_of(table: Mapping[str, Mapping]) -> dict[str, float | None]:
    """Column -> share of one table."""
    return {c: table[c]["share"] for c in COLUMNS}


def asked_counts(table: Mapping[str, Mapping]) -> dict[str, int]:
    """Column -> how many queries asked for it, of one table."""
    return {c: table[c]["asked"] for c in COLUMNS}


def rankings_table(path, meta: Mapping, split: str, gallery: str | None = "all") -> dict[str, dict]:
    """:func:`split_table` of the rankings file ``path`` (JSON Lines written by ``evaluate``)."""
    from offset_cir.io import read_jsonl

    return split_table(read_jsonl(path), meta, split, gallery)


def mean_shares(tables: list[Mapping[str, Mapping]]) -> dict[str, float | None]:
    """The mean share per column over several tables (seeds); None where a table has none."""
    out = {}
    for c in COLUMNS:
        shares = [t[c]["share"] for t in tables]
        out[c] = None if any(s is None for s in shares) else round(statistics.fmean(shares), 2)
    return out


def std_shares(tables: list[Mapping[str, Mapping]]) -> dict[str, float | None]:
    """The sample standard deviation of the share per column over two or more tables."""
    out = {}
    for c in COLUMNS:
        shares = [t[c]["share"] for t in tables]
        out[c] = None if len(shares) < 2 or any(s is None for s in shares) else round(statistics.stdev(shares), 2)
    return out


def asked_marks(meta: Mapping, split: str) -> Callable[[Mapping, str], list[tuple[str, bool]]]:
    """For the retrieval sheet: ``marks(row, image_id)`` -> ``[(attribute, has it), ...]``, the attributes the
    text of ``row``'s query asks for and whether the image ``image_id`` has each."""
    queries = {q["pairid"]: q for q in meta["queries"].get(split, [])}
    images = meta["images"]

    def marks(row: Mapping, image_id: str) -> list[tuple[str, bool]]:
        query = queries.get(row.get("pairid"))
        if query is None or image_id not in images:
            return []
        return list(attribute_hits(asked_attributes(query, images), images[image_id]).items())

    return marks


def _cell(share: float | None, std: float | None = None) -> str:
    if share is None:
        return "-"
    return f"{share:.1f}" + (f" ± {std:.1f}" if std is not None else "")


def attribute_rows(shares: Mapping[str, Mapping], stds: Mapping[str, Mapping] | None = None) -> list[list[str]]:
    """Cells of the table (one row per label of ``shares``: its share per column; ``stds`` the same labels)."""
    return [[label, *(_cell(s[c], (stds or {}).get(label, {}).get(c)) for c in COLUMNS)] for label, s in shares.items()]


def format_attribute_table(shares: Mapping[str, Mapping], asked: Mapping[str, int],
                           stds: Mapping[str, Mapping] | None = None, markdown: bool = False) -> str:
    """The table as text (or Markdown): a row per label of ``shares`` (label -> column -> share in %), a last
    row with the number of queries asking for each attribute (``asked``)."""
    head = ["model", *COLUMNS]
    rows = attribute_rows(shares, stds) + [["queries asking", *(str(asked[c]) for c in COLUMNS)]]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(COLUMNS)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    width = max(len(r[0]) for r in [head, *rows]) + 2
    cols = max(12, *(len(c) + 2 for r in rows for c in r[1:]))
    lines = [f"{head[0]:<{width}}" + "".join(f"{c:>{cols}}" for c in head[1:])]
    lines.append("-" * len(lines[0]))
    return "\n".join(lines + [f"{r[0]:<{width}}" + "".join(f"{c:>{cols}}" for c in r[1:]) for r in rows])


TABLE_TITLE = "top-1 result has what the text asks for (% of the queries asking for each attribute)"


def format_result_table(table: Mapping[str, Mapping], chance: Mapping[str, float | None] | None = None) -> str:
    """One evaluation's table (:func:`top1_attribute_table`) as ``offset eval`` prints it, with its title and,
    given, the chance row (:func:`chance_shares`)."""
    rows = {"this checkpoint": shares_of(table), **({"chance (a random image)": chance} if chance else {})}
    return f"{TABLE_TITLE}:\n" + format_attribute_table(rows, asked_counts(table))
