"""Offline CLIP tokenizer for CLIPSeg (CLIPSeg is prompted with a caption: docs/model.md#masks).

OpenCLIP ships the CLIP byte-pair vocabulary as ``bpe_simple_vocab_16e6.txt.gz``.  The functions here turn
it into the ``vocab.json`` + ``merges.txt`` pair that ``transformers.CLIPTokenizer.from_pretrained(folder)``
reads, so a CLIPSeg processor can be assembled on a machine without hub access.  Token ids match the
released CLIP tokenizer: 256 byte symbols, the same 256 with the end-of-word marker, 48,894 merges, then
``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

# Number of merges CLIP uses from the file (the file holds more): vocabulary size 49408 = 512 + merges + 2.
CLIP_NUM_MERGES = 49152 - 256 - 2
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"


def byte_symbols() -> dict[int, str]:
    """The reversible byte -> printable character table of GPT-2/CLIP byte-level BPE.

    Bytes that are printable (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for themselves; every other byte is
    given the next unused code point from 256 upwards, in byte order.  Insertion order (printable bytes first) is
    the order CLIP numbers its first 256 tokens in.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def default_bpe_path() -> Path:
    """Location of OpenCLIP's bundled BPE file (imports ``open_clip``'s package path only)."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        from offset_cir.errors import UserInputError

        raise UserInputError("open_clip is not installed: it provides bpe_simple_vocab_16e6.txt.gz for the CLIP tokenizer")
    return Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"


def clip_vocab_and_merges(bpe_path: str | os.PathLike | None = None) -> tuple[dict[str, int], list[str]]:
    """Read the gzipped BPE file; return (token -> id, merge lines ``"a b"`` in priority order)."""
    path = Path(bpe_path) if bpe_path is not None else default_bpe_path()
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    # Line 0 is a version header; CLIP keeps the first CLIP_NUM_MERGES merge lines after it.
    merges = [ln for ln in lines[1 : 1 + CLIP_NUM_MERGES]]
    if len(merges) != CLIP_NUM_MERGES or any(len(m.split()) != 2 for m in merges):
        from offset_cir.errors import UserInputError

        raise UserInputError(f"{path}: expected a CLIP BPE file with at least {CLIP_NUM_MERGES} merge lines 'a b'")
    symbols = list(byte_symbols().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [START_TOKEN, END_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        from offset_cir.errors import UserInputError

        raise UserInputError(f"{path}: the merges produce duplicate tokens; not a CLIP BPE file")
    return vocab, merges


def write_clip_tokenizer_files(folder: str | os.PathLike, bpe_path: str | os.PathLike | None = None) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` into ``folder`` (created) and return it.

    Load the result with ``transformers.CLIPTokenizer.from_pretrained(folder)``.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges(bpe_path)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return out


def build_clip_tokenizer(folder: str | os.PathLike, bpe_path: str | os.PathLike | None = None):
    """Write the tokenizer files into ``folder`` and load them as a ``transformers.CLIPTokenizer``."""
    from transformers import CLIPTokenizer

    write_clip_tokenizer_files(folder, bpe_path)
    return CLIPTokenizer.from_pretrained(str(folder))
