"""End to end with the real tiny OFFSET: synthetic benchmark test images, a model trained for a few steps, and
the CLI (`offset index`, `offset search`), the Python API and the REST service returning the same ranking."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(1)
offset_cir = pytest.importorskip("offset_cir")
pytest.importorskip("offset_cir.model.offset", reason="the OFFSET model module is not available")
synthetic = pytest.importorskip("offset_cir.data.synthetic", reason="the synthetic benchmark is not available")

from offset_cir.testing.search import kill_after_shards, train_tiny_on_synthetic  # noqa: E402

from offset_cir.cli import main as cli_main  # noqa: E402
from offset_cir.errors import CheckpointError  # noqa: E402
from offset_cir.search import Index, build_index  # noqa: E402

KW = dict(progress=False, device="cpu", distributed=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Synthetic benchmark (8 test queries, 48 test images) and a tiny OFFSET trained for 3 steps."""
    base = tmp_path_factory.mktemp("e2e")
    root, ckpt, losses = train_tiny_on_synthetic(base)
    assert all(np.isfinite(losses))
    return base, root, ckpt


def _query(root: Path):
    rec = json.loads((root / "captions" / "cap.rc2.test.json").read_text())[0]
    rel = json.loads((root / "image_splits" / "split.rc2.test.json").read_text())[rec["reference"]]
    p = (root / rel).resolve()
    return p, p.with_name(p.stem + "-segmask.png"), rec["caption"], rec


def test_cli_api_and_service_agree(trained, tmp_path, capsys):
    base, root, ckpt = trained
    idx_dir = tmp_path / "idx"
    assert cli_main(["index", "--checkpoint", str(ckpt), "--images", str(root / "test"), "--out", str(idx_dir),
                     "--workers", "0", "--batch-size", "16"]) == 0
    assert "48 images (48 encoded now" in capsys.readouterr().out
    ref, mask, text, rec = _query(root)
    assert cli_main(["search", "--index", str(idx_dir), "--image", str(ref), "--mask", str(mask), "--text", text,
                     "-k", "10", "--json", "--out", str(tmp_path / "sheet.png")]) == 0
    out = capsys.readouterr().out
    cli = json.loads(out[:out.rindex("]") + 1])
    assert [c["rank"] for c in cli] == list(range(1, 11))

    index = Index.open(idx_dir)  # the model comes from the checkpoint recorded in the manifest
    api = index.search(ref, text, k=10, mask=mask)
    assert [c["id"] for c in cli] == [h.id for h in api]
    np.testing.assert_allclose([c["score"] for c in cli], [h.score for h in api], rtol=1e-6)

    # an independent computation: encode every test image with the model, rank by cosine
    model = index.model
    names = sorted(p.stem for p in (root / "test").glob("*.png") if not p.stem.endswith("-segmask"))
    assert index.ids == names
    with torch.inference_mode():
        feats = []
        for n in names:
            img = model.preprocess.image(Image.open(root / "test" / f"{n}.png"))[None]
            m = model.preprocess.mask(Image.open(root / "test" / f"{n}-segmask.png"))[None]
            feats.append(model.encode_target(img, m)[0].numpy())
        q = model.encode_query(model.preprocess.image(Image.open(ref))[None],
                               model.preprocess.mask(Image.open(mask))[None], [text])[0].numpy()
    scores = np.stack(feats).astype(np.float16).astype(np.float32) @ q
    assert [h.id for h in api] == [names[i] for i in np.argsort(-scores, kind="stable")[:10]]

    from fastapi.testclient import TestClient

    from offset_cir.search.service import create_app

    with TestClient(create_app(index), base_url="http://localhost") as c:
        r = c.post("/search", data={"text": text, "k": "10"},
                   files={"image": ("r.png", ref.read_bytes(), "image/png"),
                          "mask": ("m.png", mask.read_bytes(), "image/png")})
        assert r.status_code == 200, r.text
        assert [x["id"] for x in r.json()["results"]] == [h.id for h in api]
        # the gallery reference path: same as the API's search_id (reference excluded, stored mask)
        r2 = c.post("/search", data={"text": text, "k": "10", "ref_id": rec["reference"]})
        assert [x["id"] for x in r2.json()["results"]] == [h.id for h in index.search_id(rec["reference"], text, 10)]
        assert rec["reference"] not in [x["id"] for x in r2.json()["results"]]

    # the contact sheet shows the first result where it should (a tile of that image, scaled to 160 px)
    sheet = Image.open(tmp_path / "sheet.png").convert("RGB")
    assert sheet.width >= 5 * 160
    tile = np.asarray(sheet.crop((176, 32, 176 + 160, 32 + 160)), dtype=np.float32)
    first = np.asarray(Image.open(api[0].path).convert("RGB").resize((160, 160)), dtype=np.float32)
    other = np.asarray(Image.open(api[-1].path).convert("RGB").resize((160, 160)), dtype=np.float32)
    assert np.abs(tile - first).mean() < 12 and np.abs(tile - first).mean() < np.abs(tile - other).mean()


def test_two_halves_equal_one_build(trained, tmp_path):
    base, root, ckpt = trained
    once = build_index(tmp_path / "once", root / "test", checkpoint=ckpt, batch_size=16, **KW)
    first = build_index(tmp_path / "halves", root / "test", checkpoint=ckpt, batch_size=5, shard_size=7, limit=24,
                        **KW)
    assert first.count == 24
    second = build_index(tmp_path / "halves", root / "test", checkpoint=ckpt, batch_size=5, shard_size=7, **KW)
    assert second.encoded == 24 and second.count == 48 == once.count
    a, b = Index.open(tmp_path / "once"), Index.open(tmp_path / "halves")
    assert a.ids == b.ids and a.manifest["checkpoint"] == b.manifest["checkpoint"]
    np.testing.assert_allclose(np.asarray(a.features, np.float32), np.asarray(b.features, np.float32), atol=2e-3)
    assert a.manifest["checkpoint"]["hash"].startswith("sha256:")
    assert json.loads((tmp_path / "once" / "model_config.json").read_text())["backbone"] == "tiny"


def test_other_checkpoint_is_refused(trained, tmp_path):
    base, root, ckpt = trained
    build_index(tmp_path / "idx", root / "test", checkpoint=ckpt, **KW)
    torch.manual_seed(1)
    other = offset_cir.save_checkpoint(offset_cir.build_model(offset_cir.ModelConfig(backbone="tiny")),
                                       tmp_path / "other")
    with pytest.raises(CheckpointError, match="cannot be mixed"):
        build_index(tmp_path / "idx", root / "test", checkpoint=other, **KW)
    with pytest.raises(CheckpointError, match="hashes to"):
        Index.open(tmp_path / "idx", checkpoint=other)
    # the CLI prints the message and exits 2
    assert cli_main(["search", "--index", str(tmp_path / "idx"), "--checkpoint", str(other), "--image",
                     str(root / "test" / "syn_test_000000.png"), "--text", "red"]) == 2


KILL_SCRIPT = """
import sys, time, torch
torch.set_num_threads(1)
import offset_cir
from offset_cir.model.offset import OFFSET
real = OFFSET.encode_target
def slow(self, *a, **kw):
    time.sleep(0.3)
    return real(self, *a, **kw)
OFFSET.encode_target = slow
from offset_cir.search import build_index
build_index({out!r}, {images!r}, checkpoint={ckpt!r}, batch_size=4, shard_size=4, progress=False,
            device="cpu", distributed=False)
"""


def test_killed_indexing_run_resumes(trained, tmp_path, monkeypatch):
    from offset_cir.model.offset import OFFSET

    base, root, ckpt = trained
    out = tmp_path / "idx"
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.format(out=str(out), images=str(root / "test"), ckpt=str(ckpt)))
    done = kill_after_shards(script, out)
    assert 2 <= done < 12 and not (out / "manifest.json").exists()
    seen = []
    real = OFFSET.encode_target

    def counting(self, images, masks=None):
        seen.append(images.shape[0])
        return real(self, images, masks)

    monkeypatch.setattr(OFFSET, "encode_target", counting)
    rep = build_index(out, root / "test", checkpoint=ckpt, batch_size=4, shard_size=4, **KW)
    assert rep.count == 48 and sum(seen) == 48 - 4 * done  # the shards of the killed run were reused
    monkeypatch.setattr(OFFSET, "encode_target", real)
    ref = build_index(tmp_path / "ref", root / "test", checkpoint=ckpt, **KW)
    a, b = Index.open(tmp_path / "ref"), Index.open(out)
    assert a.ids == b.ids and ref.count == 48
    np.testing.assert_allclose(np.asarray(a.features, np.float32), np.asarray(b.features, np.float32), atol=2e-3)
