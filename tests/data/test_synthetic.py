"""The synthetic cluttered-scene benchmark: layout, determinism, masks, captions, unseen pairs."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from offset_cir.data import synthetic as S
from offset_cir.data.synthetic import generator as G
from offset_cir.errors import DatasetError, UserInputError

N = {"n_train": 45, "n_val": 15, "n_test": 30}


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "bench"
    S.generate(root, seed=3, workers=1, progress=False, **N)
    return root


def _json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _attrs(meta: dict, name: str) -> dict:
    return {a: meta["images"][name][a] for a in S.ATTRIBUTES}


# ------------------------------------------------------------------------------------------ determinism
def test_same_seed_gives_byte_identical_files_whatever_the_workers(tmp_path):
    kw = dict(seed=11, n_train=7, n_val=3, n_test=4, progress=False)
    S.generate(tmp_path / "a", workers=1, **kw)
    S.generate(tmp_path / "b", workers=2, **kw)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(a) == 2 * (6 * 3 + 6 * 3 + 6 * 4) + 7  # images + masks + 6 JSON files + meta
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    S.generate(tmp_path / "c", workers=1, **{**kw, "seed": 12})
    c = _files(tmp_path / "c")
    differing = [k for k in a if k.endswith(".png") and a[k] != c.get(k)]
    assert len(differing) == sum(k.endswith(".png") for k in a)


# ------------------------------------------------------------------------------------------------ layout
def test_records_have_the_fields_and_types_of_the_real_cirr_val_file(bench, shared_data):
    real = _json(shared_data / "cirr" / "captions" / "cap.rc2.val.json")
    real_keys = {tuple(sorted(r)) for r in real}
    real_set_keys = {tuple(sorted(r["img_set"])) for r in real}
    assert len(real_keys) == 1 and len(real_set_keys) == 1
    real_split = _json(shared_data / "cirr" / "image_splits" / "split.rc2.val.json")
    real_path = re.compile(r"^\./[^/]+/[^/]+\.png$")
    assert all(real_path.match(v) for v in real_split.values())
    for split in S.SPLITS:
        recs = _json(bench / "captions" / f"cap.rc2.{split}.json")
        assert isinstance(recs, list) and recs
        for r in recs:
            assert tuple(sorted(r)) in real_keys
            assert tuple(sorted(r["img_set"])) in real_set_keys
            assert type(r["pairid"]) is int and type(r["img_set"]["id"]) is int
            assert isinstance(r["reference"], str) and isinstance(r["target_hard"], str)
            assert isinstance(r["caption"], str) and r["caption"].strip()
            assert r["target_soft"] == {r["target_hard"]: 1.0}
            assert type(r["target_soft"][r["target_hard"]]) is float
            m = r["img_set"]["members"]
            assert len(m) == 6 and len(set(m)) == 6 and all(isinstance(x, str) for x in m)
            assert m[r["img_set"]["reference_rank"]] == r["reference"]
            assert m[r["img_set"]["target_rank"]] == r["target_hard"]
        # members come in random order: the rank tells nothing about the role
        assert len({r["img_set"]["target_rank"] for r in recs}) >= 4
        assert len({r["img_set"]["reference_rank"] for r in recs}) >= 4
        table = _json(bench / "image_splits" / f"split.rc2.{split}.json")
        assert all(isinstance(k, str) and v == f"./{split}/{k}.png" and real_path.match(v) for k, v in table.items())


def test_every_set_member_is_in_its_split_with_a_mask_of_the_same_size(bench):
    all_names = []
    for split in S.SPLITS:
        table = _json(bench / "image_splits" / f"split.rc2.{split}.json")
        all_names += list(table)
        on_disk = {p.stem for p in (bench / split).glob("*.png") if not p.stem.endswith("-segmask")}
        assert on_disk == set(table)  # gallery = every image of the split
        for r in _json(bench / "captions" / f"cap.rc2.{split}.json"):
            assert set(r["img_set"]["members"]) <= set(table)
        for name, rel in table.items():
            img = Image.open(bench / rel)
            mask = Image.open((bench / rel).with_name(f"{name}-segmask.png"))
            assert img.mode == "RGB" and mask.mode == "L"
            assert img.size == mask.size == (64, 64)
    assert len(all_names) == len(set(all_names))  # names unique across splits


def test_counts(bench):
    meta = S.load_meta(bench)
    want_images = {"train": 6 * math.ceil(N["n_train"] / 3), "val": 6 * N["n_val"], "test": 6 * N["n_test"]}
    pairids = []
    for split, n in zip(S.SPLITS, (N["n_train"], N["n_val"], N["n_test"])):
        recs = _json(bench / "captions" / f"cap.rc2.{split}.json")
        table = _json(bench / "image_splits" / f"split.rc2.{split}.json")
        assert len(recs) == n
        assert len(table) == want_images[split]
        assert meta["counts"][split]["queries"] == n and meta["counts"][split]["images"] == want_images[split]
        pairids += [r["pairid"] for r in recs]
    assert len(pairids) == len(set(pairids))
    assert len(meta["images"]) == sum(want_images.values())
    assert meta["image_size"] == 64 and meta["seed"] == 3
    assert len(meta["vocab"]["shape"]) >= 6 and len(meta["vocab"]["colour"]) >= 8
    assert len(meta["vocab"]["size"]) == 3 and len(meta["vocab"]["pattern"]) >= 2


def test_val_and_test_sets_are_reference_target_and_one_attribute_neighbours(bench):
    meta = S.load_meta(bench)
    for split in ("val", "test"):
        for r in _json(bench / "captions" / f"cap.rc2.{split}.json"):
            tgt = _attrs(meta, r["target_hard"])
            others = [m for m in r["img_set"]["members"] if m not in (r["reference"], r["target_hard"])]
            assert len(others) == 4
            changed = []
            for m in others:
                diff = [a for a in S.ATTRIBUTES if _attrs(meta, m)[a] != tgt[a]]
                assert len(diff) == 1, (split, r["pairid"], m, diff)
                changed += diff
            tuples = {tuple(_attrs(meta, m).values()) for m in r["img_set"]["members"]}
            assert len(tuples) == 6  # no two members alike: R_subset has one right answer
            assert len(set(changed)) >= 3  # the neighbours cover different attributes


# ------------------------------------------------------------------------------------------------- masks
def test_masks_cover_the_dominant_object(bench):
    meta = S.load_meta(bench)
    S_ = meta["image_size"]
    yy, xx = np.mgrid[0:S_, 0:S_] + 0.5
    area_formula = {"circle": math.pi, "square": 2.0, "triangle": 3 * math.sqrt(3) / 4}  # unit circumradius
    checked = 0
    for name, info in list(meta["images"].items())[::3]:
        m = np.asarray(Image.open(bench / info["split"] / f"{name}-segmask.png"), dtype=np.float64) / 255
        cx, cy = info["center"]
        r = info["radius"]
        d = np.hypot(xx - cx, yy - cy)
        inside, outside = m[d <= r].mean(), m[d > r + 1.5].mean()
        assert inside > 0.25 and outside < 0.005, (name, inside, outside)
        if info["shape"] in area_formula:  # hand-worked polygon areas (circle: a 48-gon, within 0.3 %)
            assert m.sum() == pytest.approx(area_formula[info["shape"]] * r * r, rel=0.06, abs=3.0), name
            # the radius follows the named size: diameter fraction of the image side, +-5 % jitter
            assert 2 * r / S_ == pytest.approx(S.SIZES[info["size"]], rel=0.051)
        if info["pattern"] == "solid":  # the masked pixels carry the named colour
            rgb = np.asarray(Image.open(bench / info["split"] / f"{name}.png"), dtype=np.float64)
            core = rgb[m > 0.99].mean(0)
            assert np.abs(core - np.array(S.COLOURS[info["colour"]])).max() < 30, (name, core)
        checked += 1
    assert checked > 100


def test_named_sizes_are_told_apart_by_mask_area(bench):
    meta = S.load_meta(bench)
    areas: dict[tuple[str, str], list[float]] = {}
    for name, info in meta["images"].items():
        m = np.asarray(Image.open(bench / info["split"] / f"{name}-segmask.png"), dtype=np.float64) / 255
        areas.setdefault((info["shape"], info["size"]), []).append(m.sum())
    compared = 0
    for shape in S.SHAPES:
        small, medium, large = (areas.get((shape, z), []) for z in ("small", "medium", "large"))
        if small and medium:
            assert max(small) * 1.3 < min(medium), shape
            compared += 1
        if medium and large:
            assert max(medium) * 1.3 < min(large), shape
            compared += 1
    assert compared >= 12


def test_mask_noise_degrades_masks_but_not_images(tmp_path):
    kw = dict(seed=5, n_train=3, n_val=2, n_test=3, workers=1, progress=False)
    S.generate(tmp_path / "clean", **kw)
    S.generate(tmp_path / "noisy", mask_noise=0.7, **kw)
    clean, noisy = _files(tmp_path / "clean"), _files(tmp_path / "noisy")
    images = [k for k in clean if k.endswith(".png") and not k.endswith("-segmask.png")]
    masks = [k for k in clean if k.endswith("-segmask.png")]
    assert all(clean[k] == noisy[k] for k in images)
    ious, changed = [], 0
    for k in masks:
        a = np.asarray(Image.open(tmp_path / "clean" / k)) > 127
        b = np.asarray(Image.open(tmp_path / "noisy" / k)) > 127
        changed += clean[k] != noisy[k]
        ious.append((a & b).sum() / max(1, (a | b).sum()))
    assert changed >= 0.9 * len(masks)
    assert 0.3 < float(np.mean(ious)) < 0.97  # still the object, but not exactly
    m = np.zeros((64, 64), np.float32)
    m[20:40, 20:40] = 1
    assert S.degrade_mask(m, 0.0, 10.0, [1]) is m


# ------------------------------------------------------------------------------------------------- text
_SIZE_WORDS = r"\b(small|medium|large|bigger|smaller|size|resize)\b"
_PATTERN_WORDS = r"\b(plain|solid|striped|stripes|dotted|dots|pattern)\b"
_TARGET_PATTERN = {"striped": r"\bstripe[sd]?|striped\b", "dotted": r"\bdots\b|\bdotted\b",
                   "solid": r"\bplain\b|\bsolid\b|no pattern|remove the"}


def _words(text: str, vocab) -> set[str]:
    return {w for w in vocab if re.search(rf"\b{w}\b", text)}


def test_target_differs_from_reference_exactly_in_what_the_caption_names(bench):
    meta = S.load_meta(bench)
    seen_kept = seen_multi = 0
    for split in S.SPLITS:
        qmeta = {q["pairid"]: q for q in meta["queries"][split]}
        for r in _json(bench / "captions" / f"cap.rc2.{split}.json"):
            ref, tgt = _attrs(meta, r["reference"]), _attrs(meta, r["target_hard"])
            diff = {a for a in S.ATTRIBUTES if ref[a] != tgt[a]}
            q = qmeta[r["pairid"]]
            assert 1 <= len(diff) <= 3 and set(q["changes"]) == diff
            assert all(q["changes"][a] == [ref[a], tgt[a]] for a in diff)
            text = r["caption"].lower()
            kept = set(q["kept"])
            assert not kept & diff
            # colour and shape: only the reference's and the target's values are named
            for attr, vocab in (("colour", S.COLOURS), ("shape", S.SHAPES)):
                named = _words(text, vocab)
                assert named <= {ref[attr], tgt[attr]}, (text, attr)
                if attr in diff:
                    assert tgt[attr] in named, (text, attr)
                elif attr not in kept:
                    assert not named and attr not in text, (text, attr)
            # size
            if "size" in diff:
                bigger = list(S.SIZES).index(tgt["size"]) > list(S.SIZES).index(ref["size"])
                rel = re.search(r"\bbigger\b" if bigger else r"\bsmaller\b", text)
                assert rel or re.search(rf"\b{tgt['size']}\b", text), text
            elif "size" not in kept:
                assert not re.search(_SIZE_WORDS, text), text
            # pattern
            if "pattern" in diff:
                assert re.search(_TARGET_PATTERN[tgt["pattern"]], text), text
            elif "pattern" not in kept:
                assert not re.search(_PATTERN_WORDS, text), text
            seen_kept += bool(kept)
            seen_multi += len(diff) > 1
    assert seen_kept > 5 and seen_multi > 10


def test_several_phrasings_per_attribute(bench):
    caps = [r["caption"].lower() for s in S.SPLITS for r in _json(bench / "captions" / f"cap.rc2.{s}.json")]
    colour_forms = {re.sub(r"\b(%s)\b" % "|".join(S.COLOURS), "C", c) for c in caps}
    assert len(colour_forms) > 40
    assert any(c.startswith("make it") for c in caps) and any("instead" in c for c in caps)


# ------------------------------------------------------------------------------------------ unseen pairs
def test_held_out_pairs_never_dominant_in_train_and_reported_for_test(bench):
    meta = S.load_meta(bench)
    held = {tuple(p) for p in meta["heldout_pairs"]}
    assert held and len({s for s, _ in held}) == len(held)
    train_pairs = {(v["shape"], v["colour"]) for v in meta["images"].values() if v["split"] == "train"}
    assert not train_pairs & held
    # every shape and every colour is still seen in train on its own
    assert {s for s, _ in train_pairs} == set(S.SHAPES) and {c for _, c in train_pairs} == set(S.COLOURS)
    for split in ("train", "val", "test"):
        recs = _json(bench / "captions" / f"cap.rc2.{split}.json")
        want = sorted(r["pairid"] for r in recs
                      if (meta["images"][r["target_hard"]]["shape"], meta["images"][r["target_hard"]]["colour"]) in held)
        assert S.unseen_pairids(bench, split) == want
        if split == "train":
            assert want == []
        else:
            assert len(want) == round(0.25 * len(recs))
            for r in recs:  # the reference of an unseen-pair query is a seen pair
                if r["pairid"] in want:
                    ref = meta["images"][r["reference"]]
                    assert (ref["shape"], ref["colour"]) not in held


def test_the_cirr_loader_reads_the_benchmark_unchanged(bench):
    from offset_cir.data import get_dataset

    ds = get_dataset("synthetic", bench)
    assert ds.splits() == ["train", "val", "test"]
    assert len(ds.queries("test")) == N["n_test"]
    q = ds.queries("val")[0]
    assert q.target is not None and len(q.members) == 6 and ds.image_path(q.target).is_file()
    assert ds.mask_path(q.target).is_file()
    (evs,) = ds.eval_sets("test")
    assert sorted(evs.notes["unseen_pairids"]) == S.unseen_pairids(bench, "test")
    assert len(evs.galleries["all"]) == 6 * N["n_test"]


# ---------------------------------------------------------------------------------- reuse, refuse, resume
def test_reuse_refuse_overwrite_and_interrupted_run(tmp_path, monkeypatch):
    kw = dict(seed=2, n_train=4, n_val=2, n_test=2, workers=1, progress=False)
    root = tmp_path / "b"
    first = S.generate(root, **kw)
    assert first["reused"] is False and first["splits"]["test"]["queries"] == 2
    reference = _files(root)
    assert S.generate(root, **kw)["reused"] is True
    with pytest.raises(UserInputError, match="other settings"):
        S.generate(root, **{**kw, "n_test": 3})
    assert _files(root) == reference  # nothing lost
    assert S.generate(root, overwrite=True, **{**kw, "n_test": 3})["splits"]["test"]["queries"] == 3

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserInputError, match="not empty"):
        S.generate(foreign, **kw)
    S.generate(foreign, overwrite=True, **kw)
    assert (foreign / "notes.txt").read_text() == "mine"

    # an interrupted run leaves no meta; the next run notices and regenerates the same files
    calls = {"n": 0}
    real = G._render_chunk

    def dying(task):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(G, "_render_chunk", dying)
    root2 = tmp_path / "again"
    big = dict(kw, n_train=12, n_val=6, n_test=6)  # 96 images: two render chunks
    with pytest.raises(KeyboardInterrupt):
        S.generate(root2, **big)
    assert not (root2 / S.META_NAME).exists()
    with pytest.raises(DatasetError, match="interrupted"):
        S.load_meta(root2)
    monkeypatch.setattr(G, "_render_chunk", real)
    assert S.generate(root2, **big)["reused"] is False
    S.generate(tmp_path / "fresh", **big)
    assert _files(root2) == _files(tmp_path / "fresh")


def test_bad_settings_are_refused_with_the_field_named(tmp_path):
    with pytest.raises(UserInputError, match="mask_noise"):
        S.generate(tmp_path / "x", mask_noise=1.5)
    with pytest.raises(UserInputError, match="n_val"):
        S.generate(tmp_path / "x", n_val=0)
    with pytest.raises(UserInputError, match="image_size"):
        S.generate(tmp_path / "x", image_size=8)
    assert not (tmp_path / "x").exists()
    with pytest.raises(DatasetError, match="synthetic_meta.json"):
        S.load_meta(tmp_path)


def test_cli_writes_prints_and_refuses(tmp_path, capsys):
    from offset_cir.cli import main

    out = tmp_path / "cli"
    args = ["synth", "--out", str(out), "--train", "5", "--val", "2", "--test", "4", "--seed", "1", "--no-progress"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert re.search(r"test\s+4\s+24\s+4\s+1", text), text
    assert main(args) == 0 and "up to date" in capsys.readouterr().out
    assert main(args[:-1] + ["--mask-noise", "0.3", "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--mask-noise", "0.3", "--overwrite"]) == 0
    assert S.load_meta(out)["mask_noise"] == 0.3


# ------------------------------------------------------------------------------ the package
# What the generator (GENERATOR_VERSION "1") writes for generate(root, seed=0, image_size=32, n_train=20,
# n_val=5, n_test=10): the JSON files byte for byte, the images and masks of each split by their decoded pixels (a
# PNG's bytes also depend on the zlib inside Pillow). One version and seed make one benchmark, on any machine.
_GENERATOR_DIGESTS = {
    "captions/cap.rc2.test.json": "78333af26b7102c22da233074cf4ec3699a0d045dd0ecb08f432b42ae9926a3c",
    "captions/cap.rc2.train.json": "4bbcef27a5e009f22458b5fb26617b3590ad41eb255269279f668dfe9714b01c",
    "captions/cap.rc2.val.json": "1a7973f177dc26d2f7d0b6c6aeaddcae5836a647bd01c11c481f49790594b63d",
    "image_splits/split.rc2.test.json": "6971fe155120b94d2d83b9c121eb9f0db8a2ab8f15a2dab02fa39d948d71313d",
    "image_splits/split.rc2.train.json": "db9f1c3a9070830abec80ab14386585deb75c31139ca4e97502ea4782c16b006",
    "image_splits/split.rc2.val.json": "afccca10e1dc84cdb0be6c74319b35bba82fdd373432673c252ce27c03ae58f3",
    "synthetic_meta.json": "715e3535a332450e7a57a7d2512d5b4df596399d1bb74e726266fa0334142501",
    "train/*.png pixels": "e7ac6d30e5d8c83a2f506bc14f66080233009c3ebe17460134b684214adc0c81",
    "val/*.png pixels": "e19cbe1606cc0354337b99a1147c3e25caeb28eeb958d400576f6839bce658e6",
    "test/*.png pixels": "0e052e19c9353c010c0c6c3f93b3774d5aa6ff5728280bfefbaa2de634067e2c",
}


def _digests(root: Path) -> dict[str, str]:
    import hashlib

    out = {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.json"))}
    for split in ("train", "val", "test"):
        h = hashlib.sha256()
        for p in sorted((root / split).glob("*.png")):
            with Image.open(p) as im:
                h.update(f"{p.name} {im.mode} {im.size}\n".encode())
                h.update(np.asarray(im).tobytes())
        out[f"{split}/*.png pixels"] = h.hexdigest()
    return out


def test_generate_writes_the_recorded_digests(tmp_path):
    S.generate(tmp_path / "b", seed=0, image_size=32, n_train=20, n_val=5, n_test=10, workers=1, progress=False)
    got = _digests(tmp_path / "b")
    assert got.keys() == _GENERATOR_DIGESTS.keys()
    assert [k for k in got if got[k] != _GENERATOR_DIGESTS[k]] == []
    assert not (tmp_path / "b" / S.PARTIAL_MARKER).exists()


def test_loader_and_generator_read_the_meta_through_one_reader(bench, tmp_path):
    from offset_cir.data import get_dataset

    # one layout: a flat list of pair ids is refused, the same way whoever reads it
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / S.META_NAME).write_text(json.dumps({"unseen_pairids": [1, 2]}), encoding="utf-8")
    ds = get_dataset("synthetic", bench, meta_file=flat / S.META_NAME)
    with pytest.raises(DatasetError, match=r"flat/synthetic_meta.json: field 'images' missing"):
        ds.unseen_pairids("test")
    with pytest.raises(DatasetError, match=r"flat/synthetic_meta.json: field 'images' missing"):
        S.load_meta(flat)
    with pytest.raises(UserInputError, match="other settings"):  # the generator does not reuse it either
        S.generate(flat, seed=3, workers=1, progress=False, **N)
    assert json.loads((flat / S.META_NAME).read_text()) == {"unseen_pairids": [1, 2]}  # and left it alone

    meta = _json(bench / S.META_NAME)
    meta["unseen_pairids"]["test"] = ["7"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / S.META_NAME).write_text(json.dumps(meta), encoding="utf-8")
    ds = get_dataset("synthetic", bench, meta_file=bad / S.META_NAME)
    with pytest.raises(DatasetError, match=r"field 'unseen_pairids.test' must be a list of pair ids"):
        ds.eval_sets("test")
    # without a meta file there is nothing to report; CIRR's loader knows nothing of the file
    assert get_dataset("synthetic", bench, meta_file=tmp_path / "none.json").unseen_pairids("test") is None
    assert "unseen_pairids" in get_dataset("synthetic", bench).eval_sets("test")[0].notes
    assert get_dataset("cirr", bench).eval_sets("test")[0].notes == {}
    with pytest.raises(DatasetError, match="meta_file"):
        get_dataset("cirr", bench, meta_file=bench / S.META_NAME)


_PUBLIC_NAMES = (  # public names the package must export
    "GENERATOR_VERSION", "META_NAME", "PARTIAL_MARKER", "SPLITS", "SHAPES", "COLOURS", "SIZES", "PATTERNS",
    "ATTRIBUTES", "VOCAB", "DEFAULTS", "N_CHANGES_P", "CLUTTER_RANGE", "CLUTTER_DIAMETER", "shape_polygon",
    "render_image", "degrade_mask", "make_caption", "choose_heldout", "generate", "load_meta", "unseen_pairids",
)


def test_package_names_import_lazily_and_each_module_has_one_named_job():
    import importlib
    import pkgutil
    import subprocess
    import sys

    code = ("import sys, offset_cir.data.synthetic as s; "
            "print(sorted(m for m in sys.modules if m.startswith('offset_cir.data.synthetic.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # importing the package loads none of its modules
    assert set(_PUBLIC_NAMES) <= set(S.__all__) <= set(dir(S))
    for name in S.__all__:
        assert getattr(S, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        S.nope
    for info in pkgutil.iter_modules(S.__path__):
        module = importlib.import_module(f"{S.__name__}.{info.name}")
        lines = Path(module.__file__).read_text(encoding="utf-8").splitlines()
        assert module.__doc__ and module.__doc__.splitlines()[0].strip(), info.name
        assert len(lines) < 500, (info.name, len(lines))
