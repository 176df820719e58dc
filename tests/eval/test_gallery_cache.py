"""Gallery features stored per model (offset_cir.eval.gallery_cache): reused, resumed, invalidated by a file."""
from __future__ import annotations

import os

import pytest

from offset_cir.data import get_dataset
from offset_cir.eval.evaluate import evaluate
from offset_cir.eval.gallery_cache import GalleryCache
from offset_cir.testing.oracle import HashModel
from offset_cir.testing.placeholders import write_placeholder


class Counting(HashModel):
    """A HashModel that counts the gallery images it encodes and can fail after some batches."""

    def __init__(self, *args, fail_after: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.encoded, self.batches, self.fail_after = 0, 0, fail_after

    def encode_target(self, images, masks=None):
        if self.fail_after is not None and self.batches >= self.fail_after:
            raise KeyboardInterrupt("stopped on purpose")
        self.batches += 1
        self.encoded += images.shape[0]
        return super().encode_target(images, masks)


def _run(bench, model, cache):
    return evaluate(model, bench, "circo-val", batch_size=100, progress=False, gallery_cache=cache)


def test_reused_resumed_and_invalidated(circo_copy, tmp_path):
    root, codes = circo_copy
    bench = get_dataset("circo", root)
    n = len(bench.gallery())
    top = max(codes.values())
    plain = _run(bench, Counting(dim=16, max_code=top), None)

    # interrupted after 7 batches of 100: the chunks of 250 complete by then are kept
    stopped = Counting(dim=16, max_code=top, fail_after=7)
    with pytest.raises(KeyboardInterrupt):
        _run(bench, stopped, GalleryCache(tmp_path / "gc", "model-a", chunk_size=250))
    kept = sorted((tmp_path / "gc").rglob("*.safetensors"))
    assert len(kept) == 700 // 250 and not [p for p in (tmp_path / "gc").rglob("*") if ".tmp" in p.name]

    # resumed: only the rest is encoded, and the result is the uncached one
    cache = GalleryCache(tmp_path / "gc", "model-a", chunk_size=250)
    model = Counting(dim=16, max_code=top)
    first = _run(bench, model, cache)
    assert model.encoded == n - 500 and first["metrics"] == plain["metrics"]
    assert first["gallery_features"]["chunks_reused"] == 2
    chunks = -(-n // 250)
    assert first["gallery_features"]["chunks_encoded"] == chunks - 2

    # the same model again: nothing encoded
    again = Counting(dim=16, max_code=top)
    second = _run(bench, again, cache)
    assert again.encoded == 0 and second["metrics"] == plain["metrics"]
    assert (second["gallery_features"]["chunks_reused"], second["gallery_features"]["images_encoded"]) == (chunks, 0)

    # one image file changed: only its chunk is encoded again
    changed = bench.gallery()[260]
    path = bench.image_path(changed)
    write_placeholder(path, codes[changed])
    os.utime(path, ns=(1, 1))
    third = Counting(dim=16, max_code=top)
    _run(bench, third, cache)
    assert third.encoded == 250

    # another model's features are its own
    other = Counting(dim=16, max_code=top, seed=1)
    _run(bench, other, GalleryCache(tmp_path / "gc", "model-b", chunk_size=250))
    assert other.encoded == n


def test_a_torn_chunk_is_encoded_again(circo_copy, tmp_path):
    root, codes = circo_copy
    bench = get_dataset("circo", root)
    cache = GalleryCache(tmp_path / "gc", "m", chunk_size=1000)
    _run(bench, Counting(dim=8, max_code=max(codes.values())), cache)
    from safetensors import safe_open

    # chunk files are named by a hash of their files' names, sizes and dates: which one sorts first varies
    victim = sorted((tmp_path / "gc").rglob("*.safetensors"))[0]
    with safe_open(str(victim), "np") as f:
        rows = f.get_slice("features").get_shape()[0]
    assert rows in (1000, len(bench.gallery()) - 1000)
    victim.write_bytes(victim.read_bytes()[:100])
    model = Counting(dim=8, max_code=max(codes.values()))
    _run(bench, model, cache)
    assert model.encoded == rows  # that chunk alone, encoded again
    with pytest.raises(ValueError, match="model_key"):
        GalleryCache(tmp_path, "")
