"""Dominant portion segmentation end to end with tiny random BLIP + CLIPSeg loaded from folders (docs/model.md#masks and #data).

The models are built from small configs and saved with ``save_pretrained``; everything loads back through
the same by-folder path a user's downloaded model takes (``--captioner DIR`` / ``--segmenter DIR``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")

from offset_cir.cli import main as cli_main  # noqa: E402
from offset_cir.errors import DatasetError, OfflineError, UserInputError  # noqa: E402
from offset_cir.masks import MaskGenerator, find_images, get_layout, plan, run_masks  # noqa: E402
from offset_cir.masks.models import CLIPSegSegmenter, HFCaptioner  # noqa: E402
from offset_cir.io import is_temporary  # noqa: E402
from offset_cir.masks.pipeline import CAPTIONS_FILE, mask_is_valid  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from offset_cir.testing.masks import build_tiny_blip, build_tiny_clipseg

    base = tmp_path_factory.mktemp("tiny_models")
    return build_tiny_blip(base / "blip"), build_tiny_clipseg(base / "clipseg")


def make_images(folder: Path, sizes, prefix="img", seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for i, (w, h) in enumerate(sizes):
        sub = folder / ("sub" if i % 3 == 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        p = sub / f"{prefix}{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


SIZES = [(40, 30), (25, 60), (64, 64), (90, 20), (33, 47)]


def masks_cli(*args) -> int:
    return cli_main(["masks", "--no-progress", *map(str, args)])


# --------------------------------------------------------------------------------------------- library
def test_import_is_lazy_and_does_no_io():
    code = ("import sys, offset_cir.masks as m; assert m.MaskGenerator.__name__ == 'MaskGenerator'; "
            "print('transformers' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert out.stdout.split() == ["False", "False"]


def test_clip_tokenizer_matches_open_clip(tmp_path):
    from open_clip.tokenizer import SimpleTokenizer

    from offset_cir.masks.tokenizer import build_clip_tokenizer

    tok = build_clip_tokenizer(tmp_path / "tok")
    ref = SimpleTokenizer()
    assert len(tok) == 49408 and tok.convert_tokens_to_ids("<|endoftext|>") == 49407
    for text in ["a photo of a red dress", "Sleeveless, striped T-shirt!", "naïve café 42 shoes"]:
        ids = tok(text)["input_ids"]
        assert ids == [49406] + ref.encode(text) + [49407], text


def test_generator_api_with_folders(models, tmp_path):
    blip, clipseg = models
    imgs = [Image.open(p).convert("RGB") for p in make_images(tmp_path, SIZES[:3])]
    gen = MaskGenerator(captioner=str(blip), segmenter=str(clipseg), device="cpu", batch_size=2)
    masks, caps = gen.generate(imgs)
    assert [m.size for m in masks] == [im.size for im in imgs] and all(m.mode == "L" for m in masks)
    assert all(isinstance(c, str) for c in caps)
    for m in masks:
        a = np.asarray(m)
        assert a.dtype == np.uint8 and a.std() > 0  # a soft map, not a constant
    # the same captions give the same masks, with any batch size; __call__ returns masks only
    again = MaskGenerator(captioner=None, segmenter=str(clipseg), batch_size=3)(imgs, captions=caps)
    for a, b in zip(masks, again):
        assert np.abs(np.asarray(a, int) - np.asarray(b, int)).max() <= 1
    # the segmenter really sees the prompt: another caption changes the mask
    other = MaskGenerator(captioner=None, segmenter=str(clipseg))(imgs[:1], captions=["zebra stripes on a boat"])
    assert np.abs(np.asarray(other[0], int) - np.asarray(masks[0], int)).max() > 0
    assert gen.segmenter.input_size == (64, 64)


def test_blip2_captioner_in_half_precision(models, tmp_path):
    """The default captioner family (BLIP-2 + OPT) through the same folder path, in bfloat16 as on a GPU."""
    from offset_cir.testing.masks import build_tiny_blip2

    _, clipseg = models
    folder = build_tiny_blip2(tmp_path / "blip2")
    imgs = [Image.open(p).convert("RGB") for p in make_images(tmp_path / "i", SIZES[:3])]
    gen = MaskGenerator(captioner=str(folder), segmenter=str(clipseg), dtype="bfloat16", batch_size=2,
                        max_new_tokens=5)
    masks, caps = gen.generate(imgs)
    assert gen.captioner.model.dtype == gen.segmenter.model.dtype == torch.bfloat16
    assert [m.size for m in masks] == [im.size for im in imgs] and all(m.mode == "L" for m in masks)
    assert all(isinstance(c, str) and "<image>" not in c for c in caps)


# --------------------------------------------------------------------------------------------- folder CLI
def test_folder_run_names_sizes_corrupt_and_second_run(models, tmp_path, capsys):
    blip, clipseg = models
    src, out = tmp_path / "imgs", tmp_path / "masks"
    paths = make_images(src, SIZES)
    (src / "broken.jpg").write_bytes(b"this is not a jpeg")
    good = Image.open(paths[0])
    trunc = src / "truncated.png"
    Image.fromarray(np.zeros((80, 80, 3), np.uint8) + 7).save(trunc)
    trunc.write_bytes(trunc.read_bytes()[:60])  # header survives, pixel data cut
    (src / "notes.txt").write_text("not an image")

    rc = masks_cli("--images", src, "--out", out, "--captioner", blip, "--segmenter", clipseg, "--batch-size", 2)
    err = capsys.readouterr().err
    assert rc == 1
    assert "broken.jpg" in err and "truncated.png" in err and "2 failed" in err and "5 written" in err
    expected = {out / p.relative_to(src).parent / f"{p.stem}-segmask.png": p for p in paths}
    written = {p for p in out.rglob("*-segmask.png")}
    assert written == set(expected)
    for mask_path, img_path in expected.items():
        with Image.open(mask_path) as m, Image.open(img_path) as im:
            assert m.mode == "L" and m.size == im.size
            a = np.asarray(m)
            assert a.min() >= 0 and a.max() <= 255 and a.std() > 0
    caps = json.loads((out / CAPTIONS_FILE).read_text())
    assert set(caps) == {p.relative_to(src).as_posix() for p in paths}
    assert not list(out.rglob("*.tmp")) and not list(src.rglob("*segmask*"))
    good.close()

    # the masks are what the Python API gives for those captions
    gen = MaskGenerator(captioner=None, segmenter=str(clipseg))
    api = gen([Image.open(paths[1]).convert("RGB")], captions=[caps[paths[1].relative_to(src).as_posix()]])[0]
    disk = Image.open(out / f"{paths[1].stem}-segmask.png")
    assert np.abs(np.asarray(api, int) - np.asarray(disk, int)).max() <= 1

    # second run: everything valid is skipped, nothing rewritten
    mtimes = {p: p.stat().st_mtime_ns for p in written}
    rc = masks_cli("--images", src, "--out", out, "--captioner", blip, "--segmenter", clipseg)
    err = capsys.readouterr().err
    assert rc == 1 and "5 skipped" in err and "0 written" in err
    assert {p: p.stat().st_mtime_ns for p in written} == mtimes

    # an invalid mask (wrong size) is redone; --overwrite redoes all
    Image.new("L", (3, 3)).save(out / f"{paths[0].stem}-segmask.png")
    masks_cli("--images", src, "--out", out, "--captioner", blip, "--segmenter", clipseg)
    assert "1 written" in capsys.readouterr().err
    assert mask_is_valid(out / f"{paths[0].stem}-segmask.png", Image.open(paths[0]).size)
    masks_cli("--images", src, "--out", out, "--captioner", blip, "--segmenter", clipseg, "--overwrite")
    assert "5 written" in capsys.readouterr().err


def test_clean_run_exits_zero(models, tmp_path, capsys):
    _, clipseg = models
    make_images(tmp_path / "i", SIZES[:2])
    rc = masks_cli("--images", tmp_path / "i", "--out", tmp_path / "o", "--segmenter", clipseg,
                   "--fixed-prompt", "dress", "--captioner", "/nonexistent/never/loaded")
    assert rc == 0 and "2 written" in capsys.readouterr().out
    assert not (tmp_path / "o" / CAPTIONS_FILE).exists()  # no captions were used


class ExplodingCaptioner:
    built = 0

    def __init__(self):
        type(self).built += 1
        raise AssertionError("the captioner must not be built when every caption is given")


def test_captions_file_means_no_captioner(models, tmp_path):
    _, clipseg = models
    src = tmp_path / "imgs"
    paths = make_images(src, SIZES[:4])
    given = {}
    for i, p in enumerate(paths):  # every accepted key form: relative path, file name, stem
        key = [p.relative_to(src).as_posix(), p.name, p.stem][i % 3]
        given[key] = f"caption number {i}"
    seg = CLIPSegSegmenter(str(clipseg))
    seen = []

    class Recording:
        input_size = seg.input_size

        def segment(self, images, prompts):
            seen.extend(prompts)
            return seg.segment(images, prompts)

    layout = get_layout("images")
    jobs = plan(find_images("images", src), src, layout, tmp_path / "out")
    gen = MaskGenerator(captioner=ExplodingCaptioner, segmenter=Recording(), prompt_template="{caption}, photo")
    report = run_masks(jobs, gen, captions_out=tmp_path / "out" / CAPTIONS_FILE, captions=given, progress=False)
    assert report.ok and report.written == 4 and ExplodingCaptioner.built == 0
    assert sorted(seen) == sorted(f"caption number {i}, photo" for i in range(4))
    used = json.loads((tmp_path / "out" / CAPTIONS_FILE).read_text())
    assert used == {p.relative_to(src).as_posix(): f"caption number {i}" for i, p in enumerate(paths)}

    # one caption missing: now the captioner is needed and is built (and here it refuses)
    make_images(src / "more", [(20, 20)], prefix="extra")
    jobs = plan(find_images("images", src), src, layout, tmp_path / "out")
    with pytest.raises(AssertionError, match="must not be built"):
        run_masks(jobs, MaskGenerator(captioner=ExplodingCaptioner, segmenter=Recording()), captions=given,
                  progress=False)
    assert ExplodingCaptioner.built == 1


class FailAfter:
    """Wraps a segmenter; raises after ``k`` calls (an interruption between batches)."""

    def __init__(self, inner, k):
        self.inner, self.k, self.calls = inner, k, 0
        self.input_size = inner.input_size

    def segment(self, images, prompts):
        if self.calls == self.k:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        return self.inner.segment(images, prompts)


def test_interrupted_run_resumes(models, tmp_path):
    blip, clipseg = models
    src, out = tmp_path / "imgs", tmp_path / "out"
    make_images(src, SIZES * 2)  # 10 images
    jobs = plan(find_images("images", src), src, get_layout("images"), out)
    seg = CLIPSegSegmenter(str(clipseg))
    cap = HFCaptioner(str(blip))
    with pytest.raises(KeyboardInterrupt):
        run_masks(jobs, MaskGenerator(captioner=cap, segmenter=FailAfter(seg, 2), batch_size=2),
                  captions_out=out / CAPTIONS_FILE, progress=False)
    done = sorted(out.rglob("*-segmask.png"))
    assert len(done) == 4  # two batches of two
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or is_temporary(p)]
    first_caps = json.loads((out / CAPTIONS_FILE).read_text())
    assert len(first_caps) == 6  # saved on the way out, including the interrupted batch's captions
    before = {p: p.read_bytes() for p in done}

    # what a run killed outright (no clean-up) leaves beside a mask and the captions file: removed on resume;
    # a user's file of a similar name is not touched
    left = [jobs[-1].mask.with_name(f".{jobs[-1].mask.name}.tmp4242"), out / f".{CAPTIONS_FILE}.tmp77"]
    keep = jobs[-1].mask.with_name(".notes.tmp12")
    for p in left + [keep]:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"partial")
    report = run_masks(jobs, MaskGenerator(captioner=cap, segmenter=seg, batch_size=3),
                       captions_out=out / CAPTIONS_FILE, progress=False)
    assert (report.skipped, report.written, report.ok) == (4, 6, True)
    assert not any(p.exists() for p in left) and keep.read_bytes() == b"partial"
    assert all(p.read_bytes() == b for p, b in before.items())
    for job in jobs:
        assert mask_is_valid(job.mask, Image.open(job.image).size)
    caps = json.loads((out / CAPTIONS_FILE).read_text())
    assert len(caps) == 10 and all(caps[k] == v for k, v in first_caps.items())  # resumed with the same captions


def test_a_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    from offset_cir.masks import pipeline

    target = tmp_path / "a" / "x-segmask.png"
    real_save = Image.Image.save

    def half_save(self, fp, *a, **k):
        real_save(self, fp, *a, **k)
        fp.truncate(10)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(Image.Image, "save", half_save)
    with pytest.raises(OSError, match="disk full"):
        pipeline.save_mask_atomic(Image.new("L", (30, 20), 9), target)
    assert list(target.parent.iterdir()) == []
    monkeypatch.setattr(Image.Image, "save", real_save)
    pipeline.save_mask_atomic(Image.new("L", (30, 20), 9), target)
    assert mask_is_valid(target, (30, 20)) and not mask_is_valid(target, (20, 30))


def test_masks_and_captions_are_on_disk_before_they_are_renamed_into_place(tmp_path, monkeypatch):
    """A power cut after a run must not leave an empty mask or captions file under the real name."""
    import os

    from offset_cir.masks import pipeline

    fsyncs, real_fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: fsyncs.append(fd) or real_fsync(fd))
    pipeline.save_mask_atomic(Image.new("L", (30, 20), 9), tmp_path / "m" / "x-segmask.png")
    pipeline.write_json_atomic(tmp_path / "c" / CAPTIONS_FILE, {"b.jpg": "a red dress", "a.jpg": "café au lait"})
    assert len(fsyncs) == 2
    text = (tmp_path / "c" / CAPTIONS_FILE).read_text(encoding="utf-8")
    assert text == '{\n "a.jpg": "café au lait",\n "b.jpg": "a red dress"\n}\n'  # the format as before
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["x-segmask.png"]


# --------------------------------------------------------------------------------------------- datasets
def _touch_image(path: Path, size=(24, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 60, 30)).save(path)


def test_release_layouts_mask_names(tmp_path, shared_data):
    """Images placed with real names from the annotation files; masks per docs/model.md#data."""
    # FashionIQ: resized_image/<cat>/<asin>.jpg -> resized_image/<cat>_segmask/<asin>-seg.png
    fiq = tmp_path / "fiq"
    asins = json.loads((shared_data / "fashioniq/image_splits/split.dress.val.json").read_text())[:2]
    for a in asins:
        _touch_image(fiq / "resized_image/dress" / f"{a}.jpg")
    _touch_image(fiq / "resized_image/dress_segmask" / f"{asins[0]}-seg.png")  # an existing mask is no image
    jobs = plan(find_images("fashioniq", fiq), fiq, get_layout("fashioniq"))
    assert {j.mask for j in jobs} == {fiq / "resized_image/dress_segmask" / f"{a}-seg.png" for a in asins}
    assert {j.category for j in jobs} == {"dress"}

    # CIRR: paths from split.rc2.val.json; mask beside each image as <name>-segmask.png
    cirr = tmp_path / "cirr"
    split = json.loads((shared_data / "cirr/image_splits/split.rc2.val.json").read_text())
    names = sorted(split)[:3]
    for n in names:
        _touch_image(cirr / split[n], (30, 20))
        Image.new("L", (30, 20)).save((cirr / split[n]).with_name(f"{n}-segmask.png"))  # old masks are skipped
    jobs = plan(find_images("cirr", cirr), cirr, get_layout("cirr"))
    assert {j.mask for j in jobs} == {(cirr / split[n]).parent / f"{n}-segmask.png" for n in names}

    # Shoes: womens_<type>/<0or1>/img_womens_<type>_<n>.jpg -> same folder, <name>-segmask.jpg
    shoes = tmp_path / "shoes"
    shoe_names = (shared_data / "shoes/eval_im_names.txt").read_text().split()[:2]
    for n in shoe_names:
        kind = n[len("img_womens_"):].rsplit("_", 1)[0]
        _touch_image(shoes / f"womens_{kind}" / "1" / n)
    jobs = plan(find_images("shoes", shoes), shoes, get_layout("shoes"))
    assert sorted(j.mask.name for j in jobs) == sorted(f"{Path(n).stem}-segmask.jpg" for n in shoe_names)
    assert all(j.mask.parent == j.image.parent for j in jobs)
    assert all(j.category == j.image.parts[-3][len("womens_"):].replace("_", " ") for j in jobs)


def test_fashion200k_layout_and_own_pattern(tmp_path):
    root = tmp_path / "f200k"
    img = root / "women/dresses/casual_and_day_dresses/51727804/51727804_0.jpeg"
    _touch_image(img)
    (job,) = plan(find_images("fashion200k", root), root, get_layout("fashion200k"))
    assert job.mask == img.with_name("51727804_0-segmask.png") and job.category == "dresses"
    own = get_layout("fashion200k", "{out}/masks/{rel_parent}/{stem}.png")
    (job,) = plan([img], root, own, tmp_path / "elsewhere")
    assert job.mask == tmp_path / "elsewhere/masks/women/dresses/casual_and_day_dresses/51727804/51727804_0.png"
    with pytest.raises(UserInputError, match="stem"):
        get_layout("images", "{out}/mask.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="women/<category>"):
        find_images("fashion200k", tmp_path / "empty")
    inside = tmp_path / "imgs_with_out"  # an output folder inside the image folder is not walked
    _touch_image(inside / "a.jpg")
    _touch_image(inside / "masks" / "a.png")
    assert find_images("images", inside, exclude=(inside / "masks",)) == [inside / "a.jpg"]
    assert find_images("images", inside, exclude=(inside,)) == [inside / "a.jpg", inside / "masks" / "a.png"]
    with pytest.raises(UserInputError, match="would both write"):
        plan([tmp_path / "a/x.jpg", tmp_path / "b/x.png"], tmp_path, get_layout("images", "{out}/{stem}.png"))


def test_dataset_cli_with_category_prompt(models, tmp_path, capsys):
    _, clipseg = models
    root = tmp_path / "fiq"
    for cat in ("dress", "toptee"):
        for i in range(2):
            _touch_image(root / "resized_image" / cat / f"B00{cat}{i}.jpg", (20 + i, 30))
    rc = masks_cli("--dataset", "fashioniq", "--root", root, "--segmenter", clipseg,
                   "--prompt-template", "a {category}", "--captioner", "/never/used")
    assert rc == 0
    for cat in ("dress", "toptee"):
        for i in range(2):
            m = root / "resized_image" / f"{cat}_segmask" / f"B00{cat}{i}-seg.png"
            assert Image.open(m).size == (20 + i, 30)


# --------------------------------------------------------------------------------------------- errors
def test_offline_hub_name_fails_fast_naming_the_folder_option(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    sleeps = []  # a retry loop would sleep between attempts: fail fast means none
    monkeypatch.setattr(time, "sleep", lambda s: sleeps.append(s))
    with pytest.raises(OfflineError, match="--captioner DIR"):
        HFCaptioner("Salesforce/blip2-opt-2.7b")
    with pytest.raises(OfflineError, match="--segmenter DIR"):
        CLIPSegSegmenter("CIDAS/clipseg-rd64-refined")
    # not flagged offline, but the hub does not answer: same quick failure, no minute of retries
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(OfflineError, match="--captioner DIR"):
        HFCaptioner("Salesforce/blip2-opt-2.7b")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert sleeps == []
    make_images(tmp_path / "i", SIZES[:1])
    assert masks_cli("--images", tmp_path / "i", "--out", tmp_path / "o", "--fixed-prompt", "x") == 2
    assert "--segmenter DIR" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bad_arguments_are_clear(tmp_path, capsys):
    make_images(tmp_path / "i", SIZES[:1])
    assert masks_cli("--images", tmp_path / "i") == 2
    assert "--out" in capsys.readouterr().err
    bad = tmp_path / "caps.json"
    bad.write_text('["not", "a", "dict"]')
    assert masks_cli("--images", tmp_path / "i", "--out", tmp_path / "o", "--captions", bad) == 2
    assert str(bad) in capsys.readouterr().err
    assert masks_cli("--dataset", "shoes", "--root", tmp_path / "i") == 2
    assert "womens_<type>" in capsys.readouterr().err
    assert masks_cli("--images", tmp_path / "i", "--out", tmp_path / "o", "--segmenter", tmp_path / "nope") == 2
    assert "nope" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- a real kill
@pytest.mark.slow
def test_killed_process_resumes(models, tmp_path):
    """SIGKILL the CLI between images (batch size 1), then rerun: it completes and skips what was done."""
    blip, clipseg = models
    src, out = tmp_path / "imgs", tmp_path / "out"
    make_images(src, [(48, 32)] * 200)
    cmd = [sys.executable, "-m", "offset_cir.cli", "masks", "--images", str(src), "--out", str(out),
           "--captioner", str(blip), "--segmenter", str(clipseg), "--batch-size", "1", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.rglob("*-segmask.png"))) < 10:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    partial = list(out.rglob("*-segmask.png"))
    assert 10 <= len(partial) < 200, "the run finished before it could be killed"
    for p in partial:  # every file under a mask name is complete
        assert mask_is_valid(p, (48, 32))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{len(partial)} skipped" in done.stdout and f"{200 - len(partial)} written" in done.stdout
    assert len(list(out.rglob("*-segmask.png"))) == 200
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_mask_models_choose_their_device_by_the_package_rule(monkeypatch):
    """``--device`` of `offset masks` means what it means for training and indexing (offset_cir.device)."""
    from offset_cir.masks.models import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device(None) == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(UserInputError, match="--device 'cuda'.*CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(UserInputError, match="--device 'gpu0'"):  # refused here, not deep inside torch
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")  # under torchrun: this process's own GPU
    assert resolve_device("auto") == "cuda:1" and resolve_device("cuda") == "cuda:1"
    assert resolve_device("cuda:0") == "cuda:0"
