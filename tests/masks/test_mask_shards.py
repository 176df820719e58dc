"""``offset masks`` split over processes (``--shard i/N``, torchrun): disjoint, resumable, merged, and the masks
byte for byte those of one process. Tiny random BLIP + CLIPSeg loaded from folders."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("transformers")

from offset_cir.cli import main  # noqa: E402
from offset_cir.errors import UserInputError  # noqa: E402
from offset_cir.masks.pipeline import CAPTIONS_FILE, batches_of  # noqa: E402
from offset_cir.masks.shards import Shard  # noqa: E402

SIZES = [(40, 30), (25, 60), (64, 64), (90, 20), (33, 47), (50, 50), (31, 17), (64, 20), (20, 64), (45, 45),
         (28, 36), (70, 40), (16, 16)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from offset_cir.testing.masks import build_tiny_blip, build_tiny_clipseg

    base = tmp_path_factory.mktemp("tiny_models")
    return build_tiny_blip(base / "blip"), build_tiny_clipseg(base / "clipseg")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    src = tmp_path_factory.mktemp("shard_images") / "imgs"
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(SIZES):
        sub = src / ("sub" if i % 4 == 3 else "")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(sub / f"img{i:02d}.png")
    return src


def _args(models, src, out, *extra):
    blip, clipseg = models
    return ["masks", "--no-progress", "--images", str(src), "--out", str(out), "--captioner", str(blip),
            "--segmenter", str(clipseg), "--batch-size", "2", "--workers", "2", *map(str, extra)]


def _files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*-segmask.png")}


@pytest.fixture(scope="module")
def single(models, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "out"
    assert main(_args(models, images, out)) == 0
    return out


def test_shards_are_disjoint_and_together_make_one_process_masks(models, images, single, tmp_path, capsys):
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(_args(models, images, out, "--shard", "1/3")) == 0
    first = capsys.readouterr().out
    assert first.startswith("shard 1/3: masks: 4 images, 4 written") and "merged summary" in first
    # shard 1 of 3 with batches of 2: the plan's (sorted paths) blocks 1 and 4, its images 2, 3, 8 and 9
    ordered = sorted(images.rglob("*.png"))
    assert sorted(_files(out)) == sorted(ordered[i].relative_to(images).with_name(ordered[i].stem + "-segmask.png")
                                         .as_posix() for i in (2, 3, 8, 9))
    assert not (out / CAPTIONS_FILE).exists()  # a shard keeps its captions to itself until the merge
    assert main(_args(models, images, out, "--shard", "0/3")) == 0
    assert "merged summary" in capsys.readouterr().out
    assert main(_args(models, images, out, "--shard", "2/3")) == 0
    last = capsys.readouterr().out
    assert last.startswith("masks: 13 images, 13 written, 0 skipped")  # the one merged summary
    assert _files(out) == _files(single)
    assert (out / CAPTIONS_FILE).read_bytes() == (single / CAPTIONS_FILE).read_bytes()
    summary = json.loads((out / "segmask-shards" / "summary.json").read_text())
    assert (summary["shards"], summary["total"], summary["written"], summary["failed"]) == (3, 13, 13, [])
    # a second pass over every shard skips everything and merges the same files again
    for i in range(3):
        assert main(_args(models, images, out, "--shard", f"{i}/3")) == 0
    assert "13 images, 0 written, 13 skipped" in capsys.readouterr().out
    assert (out / CAPTIONS_FILE).read_bytes() == (single / CAPTIONS_FILE).read_bytes()


def test_an_interrupted_shard_resumes(models, images, single, tmp_path):
    from offset_cir.masks import MaskGenerator, find_images, get_layout, plan, run_masks
    from offset_cir.masks.models import CLIPSegSegmenter, HFCaptioner

    blip, clipseg = models

    class StopAfter:
        def __init__(self, inner, k):
            self.inner, self.k, self.calls, self.input_size = inner, k, 0, inner.input_size

        def segment(self, imgs, prompts):
            if self.calls == self.k:
                raise KeyboardInterrupt("simulated")
            self.calls += 1
            return self.inner.segment(imgs, prompts)

    out = tmp_path / "out"
    jobs = plan(find_images("images", images), images, get_layout("images"), out)
    seg, cap = CLIPSegSegmenter(str(clipseg)), HFCaptioner(str(blip))
    shard = Shard(0, 2)
    with pytest.raises(KeyboardInterrupt):
        run_masks(jobs, MaskGenerator(captioner=cap, segmenter=StopAfter(seg, 2), batch_size=2),
                  captions_out=out / CAPTIONS_FILE, progress=False, shard=shard)
    assert len(_files(out)) == 4
    report = run_masks(jobs, MaskGenerator(captioner=cap, segmenter=seg, batch_size=2),
                       captions_out=out / CAPTIONS_FILE, progress=False, shard=shard)
    assert (report.total, report.skipped, report.written) == (7, 4, 3)
    mine = {j.mask.relative_to(out).as_posix() for b in batches_of(jobs, 2, shard) for j in b}
    assert _files(out) == {k: v for k, v in _files(single).items() if k in mine}


def test_shard_options_are_checked(models, images, tmp_path, monkeypatch, capsys):
    for bad in ("3/3", "1-2", "-1/2"):
        assert main(_args(models, images, tmp_path / "o", f"--shard={bad}")) == 2
        assert "--shard" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert Shard.from_torchrun() == Shard(1, 2)
    assert main(_args(models, images, tmp_path / "o", "--shard", "0/2")) == 2
    assert "under torchrun" in capsys.readouterr().err
    with pytest.raises(UserInputError):
        Shard(2, 2)


@pytest.mark.slow
def test_torchrun_two_processes_make_one_process_masks(models, images, single, tmp_path):
    out = tmp_path / "out"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", "29617", "-m", "offset_cir.cli",
           *_args(models, images, out)[0:]]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "masks: 13 images, 13 written, 0 skipped" in done.stdout
    # each rank made its own part (7 and 6 images in batches of 2), never the other's
    totals = [json.loads((out / "segmask-shards" / f"report-{r}-of-2.json").read_text())["written"] for r in (0, 1)]
    assert totals == [7, 6]
    assert _files(out) == _files(single)
    assert (out / CAPTIONS_FILE).read_bytes() == (single / CAPTIONS_FILE).read_bytes()
