"""Modification texts: a caption naming what changes from a reference's attributes to its target's.

One phrase per changed attribute in a random wording, sometimes one phrase naming an attribute that stays,
joined in a random order and style (docs/model.md#data: CIRR-like free-form captions).
"""
from __future__ import annotations

import numpy as np

from offset_cir.data.synthetic.vocab import ATTRIBUTES


def _an(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


_SIZE_RELATIVE = {
    ("small", "medium"): "a bit bigger", ("medium", "large"): "bigger", ("small", "large"): "much bigger",
    ("medium", "small"): "smaller", ("large", "medium"): "a bit smaller", ("large", "small"): "much smaller",
}
_PATTERN_NOUN = {"striped": "stripes", "dotted": "dots", "solid": "plain fill"}
_PATTERN_ADJ = {"striped": "striped", "dotted": "dotted", "solid": "plain"}


def _change_phrases(attr: str, old: str, new: str) -> list[str]:
    if attr == "colour":
        return [f"make it {new}", f"change the colour to {new}", f"in {new} instead", f"{new} instead of {old}",
                f"turn it {new}", f"recolour it {new}", f"colour it {new}", f"it should be {new}"]
    if attr == "shape":
        return [f"make it {_an(new)}", f"change the shape to {_an(new)}", f"{_an(new)} instead of {_an(old)}",
                f"turn it into {_an(new)}", f"replace the {old} with {_an(new)}", f"use {_an(new)} shape",
                f"{new} shaped instead"]
    if attr == "size":
        rel = _SIZE_RELATIVE[(old, new)]
        return [f"make it {new}", f"change the size to {new}", f"{new} instead of {old}", f"resize it to {new}",
                f"make it {rel}", f"it should be {rel}", f"{rel} please"]
    if attr == "pattern":
        if new == "solid":
            return ["make it plain", f"remove the {_PATTERN_NOUN[old]}", f"solid instead of {_PATTERN_ADJ[old]}",
                    "no pattern", "with a solid fill", "give it a plain fill"]
        phrases = [f"make it {new}", f"add {_PATTERN_NOUN[new]}", f"with {_PATTERN_NOUN[new]}",
                   f"{new} instead of {_PATTERN_ADJ[old]}", f"give it {_PATTERN_NOUN[new]}"]
        if new == "dotted":
            phrases.append("with polka dots")
        return phrases
    raise KeyError(attr)


def _keep_phrases(attr: str, value: str) -> list[str]:
    if attr == "colour":
        return [f"keep it {value}", "keep the colour", f"still {value}", "same colour"]
    if attr == "shape":
        return [f"keep the {value}", "same shape", f"still {_an(value)}"]
    if attr == "size":
        return ["keep the size", "same size", f"still {value}"]
    if attr == "pattern":
        return [f"keep it {_PATTERN_ADJ[value]}", "same pattern", "keep the pattern"]
    raise KeyError(attr)


def make_caption(rng: np.random.Generator, ref: dict, tgt: dict, keep_p: float = 0.35) -> tuple[str, list[str]]:
    """Modification text for reference -> target attributes: one phrase per changed attribute (random wording),
    sometimes one phrase naming an attribute that stays, in random order. Returns (caption, kept attributes)."""
    changed = [a for a in ATTRIBUTES if ref[a] != tgt[a]]
    if not changed:
        raise ValueError("reference and target have the same attributes")
    clauses = []
    for a in changed:
        opts = _change_phrases(a, ref[a], tgt[a])
        clauses.append(opts[int(rng.integers(len(opts)))])
    kept: list[str] = []
    same = [a for a in ATTRIBUTES if a not in changed]
    if same and rng.random() < keep_p:
        a = same[int(rng.integers(len(same)))]
        opts = _keep_phrases(a, ref[a])
        clauses.append(opts[int(rng.integers(len(opts)))])
        kept.append(a)
    order = rng.permutation(len(clauses))
    clauses = [clauses[i] for i in order]
    if len(clauses) == 1:
        text = clauses[0]
    else:
        style = int(rng.integers(3))
        if style == 0:
            text = ", ".join(clauses[:-1]) + " and " + clauses[-1]
        elif style == 1:
            text = ", ".join(clauses)
        else:
            text = "; ".join(clauses)
    if rng.random() < 0.3:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.2:
        text += "."
    return text, kept

