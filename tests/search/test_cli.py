"""`offset index` / `offset search` as a person uses them, with the real tiny OFFSET (random weights): masks found
beside the query image, messages in CLI terms, what loading a checkpoint says, --no-progress."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("offset_cir.model.offset", reason="the OFFSET model module is not available")
from offset_cir.testing.search import make_gallery  # noqa: E402

import offset_cir  # noqa: E402
from offset_cir.cli import main as cli_main  # noqa: E402
from offset_cir.search import Index  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    make_gallery(base / "g", n=6, size=64)
    torch.manual_seed(0)
    ckpt = offset_cir.save_checkpoint(offset_cir.build_model(offset_cir.ModelConfig(backbone="tiny")), base / "ck")
    assert cli_main(["index", "--checkpoint", str(ckpt), "--images", str(base / "g"), "--out", str(base / "idx"),
                     "--workers", "0", "--device", "cpu", "--no-progress"]) == 0
    # a query image outside the gallery, with its mask beside it, and one without
    q = base / "q"
    q.mkdir()
    Image.open(base / "g" / "img001.png").save(q / "query.png")
    Image.open(base / "g" / "img001-segmask.png").save(q / "query-segmask.png")
    Image.open(base / "g" / "img002.png").save(q / "lonely.png")
    Image.new("L", (200, 50), 255).save(q / "wide-mask.png")
    return base, ckpt


def _search(base, *extra):
    return cli_main(["search", "--index", str(base / "idx"), "--text", "make it red", "-k", "4", "--json",
                     "--device", "cpu", *extra])


def test_search_uses_the_mask_beside_the_image_and_says_so(indexed, capsys):
    base, _ = indexed
    capsys.readouterr()
    assert _search(base, "--image", str(base / "q" / "query.png")) == 0
    out, err = capsys.readouterr()
    assert f"mask: {(base / 'q' / 'query-segmask.png').resolve()} (found beside the image" in err
    marked = np.asarray(Image.open(base / "q" / "query-segmask.png").convert("L")) >= 128
    assert f"coverage {marked.mean():.4f}, box " in err and " of 64x64" in err
    got = [h["id"] for h in json.loads(out)]
    want = Index.open(base / "idx").search(base / "q" / "query.png", "make it red", k=4,
                                           mask=base / "q" / "query-segmask.png")
    assert got == [h.id for h in want]


def _ids_with_mask(base, image, mask_array):
    """The ranking the Python API gives for ``image`` with the mask ``mask_array`` (uint8, made here)."""
    mask = Image.fromarray(mask_array, "L")
    return [h.id for h in Index.open(base / "idx").search(image, "make it red", k=4, mask=mask)]


def test_search_with_a_box_says_which_mask_and_what_it_marks(indexed, capsys):
    """--box marks a box of the reference, before the mask beside the image (which the person overrides)."""
    base, _ = indexed
    capsys.readouterr()
    assert _search(base, "--image", str(base / "q" / "query.png"), "--box", "8, 16,40,56") == 0
    out, err = capsys.readouterr()
    assert "mask: the box 8, 16,40,56 (--box): coverage 0.3125, box 8,16,40,56 of 64x64" in err  # 32*40/4096
    want = np.zeros((64, 64), dtype=np.uint8)
    want[16:56, 8:40] = 255
    assert [h["id"] for h in json.loads(out)] == _ids_with_mask(base, base / "q" / "query.png", want)


def test_search_with_the_whole_image(indexed, capsys):
    base, _ = indexed
    capsys.readouterr()
    assert _search(base, "--image", str(base / "q" / "lonely.png"), "--whole-image") == 0
    out, err = capsys.readouterr()
    assert "mask: the whole image (--whole-image): coverage 1.0000, box 0,0,64,64 of 64x64" in err
    want = np.full((64, 64), 255, dtype=np.uint8)
    assert [h["id"] for h in json.loads(out)] == _ids_with_mask(base, base / "q" / "lonely.png", want)


def test_a_gallery_reference_says_its_stored_mask(indexed, capsys):
    base, _ = indexed
    capsys.readouterr()
    assert _search(base, "--ref-id", "img003") == 0
    out, err = capsys.readouterr()
    assert f"mask: {(base / 'g' / 'img003-segmask.png').resolve()} (stored in the index" in err
    assert [h["id"] for h in json.loads(out)] == [h.id for h in Index.open(base / "idx").search_id("img003",
                                                                                                  "make it red", 4)]
    assert _search(base, "--ref-id", "img003", "--whole-image") == 0
    out, err = capsys.readouterr()
    assert "mask: the whole image (--whole-image): coverage 1.0000" in err


@pytest.mark.parametrize("box, phrase", [("1,2,3", "--box must be four whole numbers"),
                                         ("0,0,65,10", "--box 0,0,65,10 is not a box inside the 64x64 image"),
                                         ("10,10,10,20", "need 0 <= x0 < x1 <= 64"),
                                         ("-1,0,5,5", "--box must be four whole numbers")])
def test_a_bad_box_is_refused_naming_the_flag(indexed, capsys, box, phrase):
    base, _ = indexed
    capsys.readouterr()
    assert _search(base, "--image", str(base / "q" / "lonely.png"), f"--box={box}") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and phrase in err and "Traceback" not in err


def test_mask_flags_exclude_one_another(indexed, capsys):
    base, _ = indexed
    with pytest.raises(SystemExit):
        _search(base, "--image", str(base / "q" / "lonely.png"), "--box", "0,0,4,4", "--whole-image")
    assert "not allowed with argument" in capsys.readouterr().err


def test_missing_mask_message_names_the_cli_flags(indexed, capsys):
    base, _ = indexed
    capsys.readouterr()
    assert _search(base, "--image", str(base / "q" / "lonely.png")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--mask FILE" in err and "lonely-segmask.png" in err
    assert "--box x0,y0,x1,y1" in err and "--whole-image" in err
    assert "--captioner DIR --segmenter DIR" in err
    assert "MaskGenerator" not in err and "mask_generator" not in err and "use_masks" not in err


def test_mask_of_another_size_is_refused_naming_both(indexed, capsys):
    base, _ = indexed
    capsys.readouterr()
    assert _search(base, "--image", str(base / "q" / "query.png"), "--mask", str(base / "q" / "wide-mask.png")) == 2
    err = capsys.readouterr().err
    assert "200x50" in err and "64x64" in err and "wide-mask.png" in err and "Traceback" not in err


def test_loading_the_checkpoint_is_logged(indexed, caplog):
    base, ckpt = indexed
    caplog.set_level(logging.INFO, logger="offset_cir.search.index")
    assert _search(base, "--ref-id", "img003") == 0
    said = [r.getMessage() for r in caplog.records if r.name == "offset_cir.search.index"]
    assert any(m.startswith(f"loading checkpoint {ckpt}") for m in said), said
    assert any(m.startswith(f"loaded checkpoint {ckpt} in ") for m in said), said


def test_index_prints_the_ann_tuning_table(indexed, tmp_path, capsys):
    """A gallery above --exact-max gets FAISS; `offset index` shows how its search parameter was tuned."""
    base, ckpt = indexed
    capsys.readouterr()
    assert cli_main(["index", "--checkpoint", str(ckpt), "--images", str(base / "g"), "--out", str(tmp_path / "a"),
                     "--workers", "0", "--device", "cpu", "--no-progress", "--exact-max", "2"]) == 0
    out = capsys.readouterr().out
    assert "efSearch" in out and "recall@" in out and "<- chosen" in out and "search: hnsw" in out


def test_index_no_progress_draws_no_bar(indexed, tmp_path, capsys):
    base, ckpt = indexed
    capsys.readouterr()
    assert cli_main(["index", "--checkpoint", str(ckpt), "--images", str(base / "g"), "--out", str(tmp_path / "a"),
                     "--workers", "0", "--device", "cpu", "--no-progress"]) == 0
    quiet = capsys.readouterr()
    assert "6 images (6 encoded now" in quiet.out and "encode:" not in quiet.err and "img/s" not in quiet.err


def test_index_and_search_name_the_run_folders_checkpoints(indexed, tmp_path, capsys):
    """`--checkpoint RUN` (a training run's folder) is told to name RUN/best or RUN/last, on index and on search,
    not reported as a hash mismatch; a path that does not exist says so."""
    base, ckpt = indexed
    run = tmp_path / "run"
    import shutil

    shutil.copytree(ckpt, run / "last")
    capsys.readouterr()
    assert cli_main(["index", "--checkpoint", str(run), "--images", str(base / "g"), "--out", str(tmp_path / "i2"),
                     "--workers", "0", "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'last'} (latest step)" in err and "Traceback" not in err
    assert _search(base, "--ref-id", "img001", "--checkpoint", str(run)) == 2
    err = capsys.readouterr().err
    assert str(run / "last") in err and "hashes to" not in err
    assert _search(base, "--ref-id", "img001", "--checkpoint", str(tmp_path / "nowhere")) == 2
    assert "does not exist" in capsys.readouterr().err


def test_precision_flags_of_index_and_search(indexed, tmp_path, capsys):
    """`offset index --precision bf16` encodes the gallery in bf16 and records it; `offset search --precision bf16`
    ranks like fp32 (cosines within bf16's rounding of each other); auto says what it chose."""
    base, ckpt = indexed
    capsys.readouterr()
    assert cli_main(["index", "--checkpoint", str(ckpt), "--images", str(base / "g"), "--out", str(tmp_path / "b"),
                     "--workers", "0", "--device", "cpu", "--no-progress", "--precision", "bf16"]) == 0
    assert "gallery images: precision bf16 (bf16: asked for)" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["runtime"] == {"runtime": "torch", "precision": "bf16"}
    assert json.loads((base / "idx" / "manifest.json").read_text())["runtime"] == {"runtime": "torch"}  # fp32

    assert _search(base, "--ref-id", "img003") == 0
    want = json.loads(capsys.readouterr().out)
    assert _search(base, "--ref-id", "img003", "--precision", "bf16") == 0
    printed = capsys.readouterr()
    got = json.loads(printed.out)
    assert "query: precision bf16 (bf16: asked for)" in printed.err
    assert [r["id"] for r in got][:2] == [r["id"] for r in want][:2]
    assert max(abs(a["score"] - b["score"]) for a, b in zip(got, want) if a["id"] == b["id"]) < 0.01

    assert cli_main(["index", "--checkpoint", str(ckpt), "--images", str(base / "g"), "--out", str(tmp_path / "a"),
                     "--workers", "0", "--device", "cpu", "--no-progress", "--precision", "auto"]) == 0
    out = capsys.readouterr().out
    assert "gallery images: precision " in out and "(auto: " in out and "cosine of bf16 with fp32" in out
