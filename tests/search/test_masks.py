"""The mask pipeline inside search: `offset index` makes masks for gallery images that have none, and the service
makes one for an uploaded reference (tiny random BLIP + CLIPSeg folders from offset_cir.testing.masks; their
masks are meaningless, the plumbing is real)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")
pytest.importorskip("offset_cir.model.offset", reason="the OFFSET model module is not available")
testing = pytest.importorskip("offset_cir.testing.masks", reason="the mask pipeline is not available")

from offset_cir.testing.search import make_gallery  # noqa: E402

import offset_cir  # noqa: E402
from offset_cir.cli import main as cli_main  # noqa: E402
from offset_cir.search import Index  # noqa: E402
from offset_cir.search.inputs import make_mask_generator  # noqa: E402

torch.set_num_threads(1)


def test_index_and_service_use_the_mask_pipeline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cap = testing.build_tiny_blip(tmp_path / "blip")
    seg = testing.build_tiny_clipseg(tmp_path / "clipseg")
    root = tmp_path / "g"
    make_gallery(root, n=6, masks=False, size=64, sub_every=3)
    torch.manual_seed(0)
    ckpt = offset_cir.save_checkpoint(offset_cir.build_model(offset_cir.ModelConfig(backbone="tiny")), tmp_path / "ck")
    # without the pipeline: a clear error naming what is missing
    assert cli_main(["index", "--checkpoint", str(ckpt), "--images", str(root), "--out", str(tmp_path / "idx"),
                     "--workers", "0"]) == 2
    assert "have no mask" in capsys.readouterr().err
    assert cli_main(["index", "--checkpoint", str(ckpt), "--images", str(root), "--out", str(tmp_path / "idx"),
                     "--workers", "0", "--captioner", str(cap), "--segmenter", str(seg), "--device", "cpu"]) == 0
    made = sorted((tmp_path / "idx" / "masks").rglob("*-segmask.png"))
    assert [p.relative_to(tmp_path / "idx" / "masks").as_posix() for p in made] == [
        "img001-segmask.png", "img002-segmask.png", "img004-segmask.png", "img005-segmask.png",
        "sub/img000-segmask.png", "sub/img003-segmask.png"]
    assert Image.open(made[0]).mode == "L" and Image.open(made[0]).size == (64, 64)
    man = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert man["count"] == 6

    gen = make_mask_generator(cap, seg, "cpu")
    index = Index.open(tmp_path / "idx", mask_generator=gen)
    ref = root / "img001.png"
    # the generated mask for a gallery image equals the stored one, so the two query paths agree
    stored = index.item("img001")["mask"]
    a = index.search(ref, "make it red", k=5)
    b = index.search(ref, "make it red", k=5, mask=stored)
    assert [h.id for h in a] == [h.id for h in b]
    np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-5)

    from fastapi.testclient import TestClient

    from offset_cir.search.service import create_app

    with TestClient(create_app(index), base_url="http://localhost") as c:
        r = c.post("/search", data={"text": "make it red", "k": "5"},
                   files={"image": ("r.png", ref.read_bytes(), "image/png")})
        assert r.status_code == 200, r.text
        assert r.json()["query"]["mask"]["mode"] == "generated" and c.get("/health").json()["mask_pipeline"] is True
        dominant = np.asarray(Image.open(stored).convert("L")) >= 128  # the pipeline made this same mask
        assert r.json()["query"]["mask"]["coverage"] == pytest.approx(dominant.mean(), abs=1e-6)
        assert "generated" in c.get("/health").json()["mask_modes"]
        assert [x["id"] for x in r.json()["results"]] == [h.id for h in a]

    # `offset search` takes the same --captioner/--segmenter as `offset serve` and says where the mask came from
    capsys.readouterr()
    assert cli_main(["search", "--index", str(tmp_path / "idx"), "--image", str(ref), "--text", "make it red",
                     "-k", "5", "--json", "--device", "cpu", "--captioner", str(cap), "--segmenter", str(seg)]) == 0
    out, err = capsys.readouterr()
    assert "mask: made by the mask pipeline" in err
    assert [h["id"] for h in json.loads(out)] == [h.id for h in a]
