"""The index folder's format (offset_cir.search.format): the manifest and its checks, older manifests, shards, the
identity of the model the features came from, and the one check that two identities are the same."""
from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from offset_cir.errors import CheckpointError, UserInputError
from offset_cir.model.checkpoint import require_same_checkpoint
from offset_cir.search import Index, build_index
from offset_cir.search import format as fmt
from offset_cir.testing.search import PixelModel, make_gallery

torch.set_num_threads(1)
KW = dict(progress=False, device="cpu", distributed=False)
PACKAGE = Path(fmt.__file__).resolve().parents[1]


def test_models_without_weights_are_identified_by_their_checkpoint_hash():
    """Two ONNX encoders (no torch state) of different checkpoints must not share one index identity."""
    from offset_cir.search.format import model_state_hash

    class Encoder:  # the shape of offset_cir.export.runtime.OnnxEncoder: no tensors, a recorded source
        def __init__(self, h):
            self.checkpoint_hash = h

        def state_dict(self):
            return {}

    a, b = Encoder("sha256:" + "a" * 64), Encoder("sha256:" + "b" * 64)
    assert model_state_hash(a) == a.checkpoint_hash != model_state_hash(b)
    with pytest.raises(CheckpointError, match="no weights to identify it by"):
        model_state_hash(Encoder(None))


def test_require_same_checkpoint_refuses_another_naming_both_hashes():
    a, b = "sha256:" + "0123456789ab" + "c" * 52, "sha256:" + "fedcba987654" + "d" * 52
    with pytest.raises(CheckpointError) as err:
        require_same_checkpoint(a, b, found_in="checkpoint runs/x", recorded_in="index pics.idx")
    msg = str(err.value)
    assert msg.startswith("checkpoint runs/x hashes to sha256:0123456789ab…, but index pics.idx was built with "
                          "sha256:fedcba987654…: "), msg
    require_same_checkpoint(a, a, found_in="x", recorded_in="y")  # the same: nothing to say
    require_same_checkpoint(None, b, found_in="x", recorded_in="y")  # nothing to compare
    with pytest.raises(CheckpointError, match=r"state:aaaaaaaaaaaa….*state:bbbbbbbbbbbb…: because"):
        require_same_checkpoint("state:" + "a" * 64, "state:" + "b" * 64, found_in="m", recorded_in="i",
                                why="because")


def test_opening_with_another_model_names_both_identities(tmp_path):
    """The index side of the check: the recorded identity (read from the manifest) and the offered model's."""
    make_gallery(tmp_path / "g", n=4)
    build_index(tmp_path / "idx", tmp_path / "g", model=PixelModel(seed=0), **KW)
    recorded = json.loads((tmp_path / "idx" / "manifest.json").read_text())["checkpoint"]["hash"]
    other = PixelModel(seed=1)
    offered = fmt.model_state_hash(other)
    with pytest.raises(CheckpointError) as err:
        Index.open(tmp_path / "idx", model=other)
    assert recorded[:18] in str(err.value) and offered[:18] in str(err.value) and recorded != offered
    with pytest.raises(CheckpointError, match="cannot be mixed") as err:
        build_index(tmp_path / "idx", tmp_path / "g", model=other, **KW)
    assert recorded[:18] in str(err.value) and offered[:18] in str(err.value)


def test_the_checkpoint_identity_check_is_written_once():
    """One function compares checkpoint identities and words the refusal: no other module of the package says
    "hashes to" itself (the index, the builder and the ONNX runtime all call require_same_checkpoint)."""
    sayers = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and "hashes to" in node.value:
                sayers.append(path.relative_to(PACKAGE).as_posix())
    assert sorted(set(sayers)) == ["model/checkpoint.py"], sayers
    callers = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
               if "require_same_checkpoint(" in p.read_text(encoding="utf-8")}
    assert {"search/index.py", "search/build.py", "export/runtime.py"} <= callers, callers


def test_new_manifests_say_uses_masks_and_old_ones_still_open(tmp_path):
    root = tmp_path / "g"
    make_gallery(root, n=6)
    model = PixelModel()
    build_index(tmp_path / "idx", root, model=model, **KW)
    path = tmp_path / "idx" / "manifest.json"
    man = json.loads(path.read_text())
    assert man["uses_masks"] is True and "needs_masks" not in man
    want = Index.open(tmp_path / "idx", model=model).search_id("img001", "red", k=3)

    man["needs_masks"] = man.pop("uses_masks")  # an older manifest: needs_masks in place of uses_masks
    path.write_text(json.dumps(man))
    old = Index.open(tmp_path / "idx", model=model)
    assert old.uses_masks is True and old.search_id("img001", "red", k=3) == want
    man["needs_masks"] = False
    path.write_text(json.dumps(man))
    assert Index.open(tmp_path / "idx", model=model).uses_masks is False
    assert fmt.manifest_uses_masks({"uses_masks": False, "needs_masks": True}) is False  # the new key wins


def test_old_exports_still_say_whether_they_use_masks():
    from offset_cir.export.runtime import OnnxEncoder

    enc = OnnxEncoder.__new__(OnnxEncoder)  # only its export.json matters here
    for meta, want in (({"needs_masks": False}, False), ({"uses_masks": False}, False), ({"uses_masks": True}, True),
                       ({}, True)):
        enc.meta = meta
        assert enc.uses_masks is want, meta


def test_read_index_manifest_refuses_foreign_and_newer_folders(tmp_path):
    assert fmt.read_index_manifest(tmp_path) is None
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else", "version": 1}))
    with pytest.raises(UserInputError, match="field 'format' is 'something-else'"):
        fmt.read_index_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": fmt.FORMAT, "version": fmt.VERSION + 1}))
    with pytest.raises(UserInputError, match="newer than this offset-cir"):
        fmt.read_index_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("[1, 2")
    with pytest.raises(UserInputError, match="not valid JSON"):
        fmt.read_index_manifest(tmp_path)


def test_shards_round_trip_and_foreign_ones_are_ignored(tmp_path):
    (tmp_path / fmt.SHARDS_DIR).mkdir()
    items = [{"id": "a"}, {"id": "b"}]
    feats = np.arange(8, dtype=np.float16).reshape(2, 4)
    name = fmt.shard_name(["a", "b"])
    assert name == "shard-" + hashlib.sha1(b"a\nb").hexdigest()[:20] and not fmt.shard_done(tmp_path, name)
    fmt.write_shard(tmp_path, name, feats, "sha256:x", 4, items, [{"id": "c", "error": "broken"}])
    assert fmt.shard_done(tmp_path, name)
    (shard,) = fmt.completed_shards(tmp_path, "sha256:x", 4)
    assert shard.items == items and shard.skipped == [{"id": "c", "error": "broken"}]
    np.testing.assert_array_equal(shard.features(), feats)
    assert fmt.completed_shards(tmp_path, "sha256:other", 4) == []  # another checkpoint's work
    assert fmt.completed_shards(tmp_path, "sha256:x", 8) == []  # another width
    shard.remove()
    assert list((tmp_path / fmt.SHARDS_DIR).iterdir()) == []


def test_generations_and_what_an_update_removes(tmp_path):
    gen = fmt.Generation.after({"generation": 6})
    assert (gen.features, gen.items, gen.faiss) == ("features-000007.npy", "items-000007.jsonl",
                                                    "faiss-000007.index")
    assert fmt.Generation.after(None).number == 1
    for name in ("features-000006.npy", "items-000006.jsonl", "faiss-000006.index", gen.features, gen.items,
                 ".features-000007.npy.tmp123", "notes.txt"):
        (tmp_path / name).write_text("x")
    fmt.remove_replaced(tmp_path, {gen.features, gen.items})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([gen.features, gen.items, "notes.txt"])


def test_item_records_describe_the_file_as_it_is(tmp_path):
    img, mask = tmp_path / "a.png", tmp_path / "a-segmask.png"
    Image.new("RGB", (4, 4)).save(img)
    Image.new("L", (4, 4)).save(mask)
    rec = fmt.file_record("a", img, mask)
    assert (rec["size"], rec["mtime_ns"]) == (img.stat().st_size, img.stat().st_mtime_ns)
    assert rec["mask"] == str(mask) and rec["mask_mtime_ns"] == mask.stat().st_mtime_ns
    assert fmt.same_file(dict(rec), rec, use_masks=True)
    assert not fmt.same_file(dict(rec, mask_mtime_ns=1), rec, use_masks=True)
    assert fmt.same_file(dict(rec, mask_mtime_ns=1), rec, use_masks=False)  # masks unused: not compared
    assert not fmt.same_file(dict(rec, size=1), rec, use_masks=False)
