"""Search without training: an index of a backbone's own features (``offset index --baseline``), searched by the CLI,
the Python API and the service in each of the three query modes, checked against a numpy ranking of the backbone's
features; its manifest's identity, the refusals of other weights, and the flags."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from open_clip.model import CLIP
from PIL import Image
from safetensors.torch import save_file

from offset_cir.testing.search import PixelModel, make_gallery

from offset_cir.cli import main
from offset_cir.errors import CheckpointError, UserInputError
from offset_cir.model.towers import PACKAGE_BACKBONES
from offset_cir.search import Index, build_index

torch.set_num_threads(1)
MODES = ("image", "text", "image+text")
TEXT = "make it red"
N = 10


def _tiny_weights(path: Path, seed: int) -> Path:
    """An OpenCLIP state dict of the ``tiny`` backbone (random, from ``seed``) saved as safetensors."""
    cfg = PACKAGE_BACKBONES["tiny"]
    torch.manual_seed(seed)
    clip = CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"])
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A gallery (with masks beside the images, which a baseline ignores), two weights files, and the index of the
    first one's image+text baseline, built by the CLI with float32 storage."""
    base = tmp_path_factory.mktemp("baseline-search")
    make_gallery(base / "photos", n=N, size=24)
    w0, w1 = _tiny_weights(base / "w0.safetensors", 0), _tiny_weights(base / "w1.safetensors", 1)
    assert main(["index", "--baseline", "image+text", "--backbone", "tiny", "--pretrained", str(w0),
                 "--images", str(base / "photos"), "--out", str(base / "idx"), "--dtype", "float32",
                 "--workers", "0", "--no-progress"]) == 0
    return base, w0, w1


def _gallery_paths(base: Path) -> tuple[list[str], list[Path]]:
    paths = sorted(p for p in (base / "photos").rglob("*.png") if not p.stem.endswith("-segmask"))
    ids = [p.relative_to(base / "photos").with_suffix("").as_posix() for p in paths]
    return ids, paths


def _numpy_ranking(weights: Path, base: Path, reference: Path, text: str, mode: str) -> tuple[list[str], np.ndarray]:
    """The ranking of the whole gallery by the backbone's own features, worked out here: global image features g
    and the text's global feature t (L2-normalised in numpy), the query g_ref, t or normalise(g_ref + t)."""
    from offset_cir import ModelConfig, build_model

    model = build_model(ModelConfig(backbone="tiny", pretrained=str(weights))).eval()
    ids, paths = _gallery_paths(base)
    with torch.no_grad():
        imgs = torch.stack([model.preprocess.image(Image.open(p).convert("RGB")) for p in paths + [reference]])
        g = model.backbone.encode_image(imgs)[1].double().numpy()
        t = model.backbone.encode_text(model.tokenizer([text]))[1].double().numpy()[0]
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    t /= np.linalg.norm(t)
    gallery, ref = g[:-1], g[-1]
    q = {"image": ref, "text": t, "image+text": (ref + t) / np.linalg.norm(ref + t)}[mode]
    scores = gallery @ q
    order = np.argsort(-scores, kind="stable")
    return [ids[i] for i in order], scores[order]


def _reference(base: Path) -> Path:
    return base / "photos" / "img001.png"


def test_the_manifest_records_the_baseline_and_its_identity(built):
    base, w0, _ = built
    man = json.loads((base / "idx" / "manifest.json").read_text())
    digest = hashlib.sha256(w0.read_bytes()).hexdigest()
    assert man["checkpoint"] == {"path": None, "hash": f"baseline-target:tiny:sha256:{digest}:seed0"}
    assert man["baseline"] == {"mode": "image+text", "backbone": "tiny", "pretrained": str(w0.resolve()),
                               "checkpoint": None, "seed": 0}
    assert man["uses_masks"] is False and man["target_masks"] is False and man["query_masks"] is False
    config = json.loads((base / "idx" / "model_config.json").read_text())
    assert config["baseline"] == "image+text" and config["backbone"] == "tiny"
    assert man["count"] == N and man["dim"] == PACKAGE_BACKBONES["tiny"]["embed_dim"]


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_ranks_as_the_backbones_own_features(built, mode, capsys):
    base, w0, _ = built
    want_ids, want_scores = _numpy_ranking(w0, base, _reference(base), TEXT, mode)
    # the command line, with the mode chosen at search time (the index was built with image+text)
    assert main(["search", "--index", str(base / "idx"), "--image", str(_reference(base)), "--text", TEXT,
                 "-k", str(N), "--json", "--baseline", mode]) == 0
    captured = capsys.readouterr()
    cli = json.loads(captured.out)
    assert [c["id"] for c in cli] == want_ids
    np.testing.assert_allclose([c["score"] for c in cli], want_scores, atol=1e-5)
    assert f"query: baseline {mode} of backbone tiny" in captured.err
    assert "mask: none (this model uses no mask)" in captured.err  # the mask beside the image is not used
    # the Python API
    index = Index.open(base / "idx", baseline=mode, device="cpu")
    assert index.baseline["mode"] == mode and not index.uses_masks and not index.uses_query_mask
    assert [h.id for h in index.search(_reference(base), TEXT, k=N)] == want_ids


def test_the_default_mode_is_the_one_built_with_and_an_update_reuses_the_gallery(built, tmp_path):
    base, w0, _ = built
    index = Index.open(base / "idx", device="cpu")
    assert index.baseline == {"mode": "image+text", "backbone": "tiny", "pretrained": str(w0.resolve()),
                              "checkpoint": None, "seed": 0}
    want, _ = _numpy_ranking(w0, base, _reference(base), TEXT, "image+text")
    assert [h.id for h in index.search(_reference(base), TEXT, k=N)] == want
    # another mode over the same features: nothing is encoded again, the manifest says the new default mode
    idx = tmp_path / "idx"
    shutil.copytree(base / "idx", idx)
    from offset_cir.model.baseline import BaselineEncoder

    rep = build_index(idx, base / "photos", model=BaselineEncoder.from_backbone("tiny", str(w0), "text"),
                      progress=False, device="cpu", distributed=False)
    assert rep.encoded == 0 and rep.reused == N
    assert Index.open(idx, device="cpu").baseline["mode"] == "text"


def test_other_weights_or_another_backbone_are_refused_naming_both_identities(built, capsys):
    base, w0, w1 = built
    d0 = hashlib.sha256(w0.read_bytes()).hexdigest()[:12]
    d1 = hashlib.sha256(w1.read_bytes()).hexdigest()[:12]
    with pytest.raises(CheckpointError) as err:
        Index.open(base / "idx", pretrained=str(w1), device="cpu")
    msg = str(err.value)
    assert f"baseline-target:tiny:sha256:{d1}…:seed0" in msg and f"baseline-target:tiny:sha256:{d0}…:seed0" in msg
    assert str(w1) in msg and str(w0.resolve()) in msg
    from offset_cir.model.baseline import BaselineEncoder

    with pytest.raises(CheckpointError) as err:  # another backbone (of random weights)
        Index.open(base / "idx", model=BaselineEncoder.from_backbone("small", None, "image"))
    assert "baseline-target:small:None:seed0" in str(err.value) and d0 in str(err.value)
    with pytest.raises(CheckpointError, match="state:"):  # a trained model is not the baseline's either
        Index.open(base / "idx", model=PixelModel(dim=PACKAGE_BACKBONES["tiny"]["embed_dim"]))
    # the command lines: search and an update of the index with other weights
    assert main(["search", "--index", str(base / "idx"), "--image", str(_reference(base)), "--text", TEXT,
                 "--pretrained", str(w1)]) == 2
    err_text = capsys.readouterr().err
    assert d0 in err_text and d1 in err_text
    assert main(["index", "--baseline", "image", "--backbone", "tiny", "--pretrained", str(w1), "--images",
                 str(base / "photos"), "--out", str(base / "idx"), "--workers", "0", "--no-progress"]) == 2
    err_text = capsys.readouterr().err
    assert "cannot be mixed" in err_text and d0 in err_text and d1 in err_text


def test_a_moved_weights_file_is_named_and_found_again_with_pretrained(built, tmp_path):
    base, w0, _ = built
    idx, gone = tmp_path / "idx", tmp_path / "gone.safetensors"
    shutil.copy(w0, gone)
    build_index(idx, base / "photos", model=_encoder(gone, "image"), progress=False, device="cpu",
                distributed=False)
    moved = gone.rename(tmp_path / "moved.safetensors")
    with pytest.raises(CheckpointError, match=f"{gone}.*does not exist.*--pretrained"):
        Index.open(idx, device="cpu")
    index = Index.open(idx, pretrained=str(moved), device="cpu")
    assert index.baseline["pretrained"] == str(moved)
    want, _ = _numpy_ranking(w0, base, _reference(base), TEXT, "image")
    assert [h.id for h in index.search(_reference(base), TEXT, k=N)] == want


def _encoder(weights, mode):
    from offset_cir.model.baseline import BaselineEncoder

    return BaselineEncoder.from_backbone("tiny", str(weights), mode)


def test_baseline_options_are_refused_for_an_index_of_a_trained_model(tmp_path, capsys):
    make_gallery(tmp_path / "g", n=4)
    build_index(tmp_path / "idx", tmp_path / "g", model=PixelModel(), progress=False, device="cpu",
                distributed=False)
    with pytest.raises(UserInputError, match="trained model.*--baseline and --pretrained apply"):
        Index.open(tmp_path / "idx", model=PixelModel(), baseline="text")
    assert main(["search", "--index", str(tmp_path / "idx"), "--image", str(tmp_path / "g" / "img001.png"),
                 "--text", TEXT, "--baseline", "text"]) == 2
    assert "--baseline" in capsys.readouterr().err


def test_the_service_says_which_baseline_and_answers_in_each_mode(built):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from offset_cir.search.service import create_app
    from offset_cir.search.service.routes import mask_modes

    base, w0, _ = built
    buf = io.BytesIO()
    Image.open(_reference(base)).save(buf, format="PNG")
    rankings = {mode: _numpy_ranking(w0, base, _reference(base), TEXT, mode)[0] for mode in MODES}
    assert len({tuple(r) for r in rankings.values()}) == 3  # the modes are told apart by the rankings below
    for mode in MODES:
        index = Index.open(base / "idx", baseline=mode, device="cpu")
        assert mask_modes(index) == ()  # the gallery has stored masks, but a baseline uses none
        with TestClient(create_app(index), base_url="http://localhost") as c:
            health = c.get("/health").json()
            assert health["baseline"] == {"mode": mode, "backbone": "tiny", "pretrained": str(w0.resolve()),
                                          "checkpoint": None, "seed": 0}
            assert health["uses_masks"] is False and health["mask_modes"] == []
            assert health["checkpoint_hash"].startswith("baseline-target:tiny:sha256:")
            r = c.post("/search", data={"text": TEXT, "k": str(N)},
                       files={"image": ("ref.png", buf.getvalue(), "image/png")})
            assert r.status_code == 200, r.text
            want_ids, want_scores = _numpy_ranking(w0, base, _reference(base), TEXT, mode)
            body = r.json()
            assert [x["id"] for x in body["results"]] == want_ids
            np.testing.assert_allclose([x["score"] for x in body["results"]], want_scores, atol=1e-5)
            assert body["query"]["mask"]["mode"] == "none"


def test_a_checkpoints_backbone_as_baseline(built, tmp_path, capsys):
    """``--baseline MODE --checkpoint CKPT``: the checkpoint's backbone, identified by the checkpoint's hash but
    apart from the trained model's own index."""
    from offset_cir import ModelConfig, build_model, save_checkpoint

    base, w0, _ = built
    torch.manual_seed(3)
    ckpt = save_checkpoint(build_model(ModelConfig(backbone="tiny", pretrained=str(w0))), tmp_path / "ckpt")
    idx = tmp_path / "idx"
    assert main(["index", "--baseline", "image", "--checkpoint", str(ckpt), "--images", str(base / "photos"),
                 "--out", str(idx), "--dtype", "float32", "--workers", "0", "--no-progress"]) == 0
    man = json.loads((idx / "manifest.json").read_text())
    digest = hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()
    assert man["checkpoint"] == {"path": str(ckpt.resolve()), "hash": f"baseline-target:checkpoint:{digest}"}
    assert man["baseline"] == {"mode": "image", "backbone": None, "pretrained": None,
                               "checkpoint": str(ckpt.resolve()), "seed": 0}
    want, _ = _numpy_ranking(w0, base, _reference(base), TEXT, "image")  # the checkpoint's backbone is w0's
    assert [h.id for h in Index.open(idx, device="cpu").search(_reference(base), TEXT, k=N)] == want
    with pytest.raises(UserInputError, match="--pretrained applies to a named backbone"):
        Index.open(idx, pretrained=str(w0))
    capsys.readouterr()
    assert main(["index", "--checkpoint", str(ckpt), "--images", str(base / "photos"), "--out", str(idx),
                 "--workers", "0", "--no-progress"]) == 2  # the trained model's features are others
    err = capsys.readouterr().err
    assert "cannot be mixed" in err and f"sha256:{digest[:12]}…" in err and f"checkpoint:{digest[:12]}…" in err


@pytest.mark.parametrize("extra, phrase", [
    (["--baseline", "image", "--backbone", "tiny", "--checkpoint", "ckpt"], "--baseline image needs its backbone"),
    (["--baseline", "image"], "--backbone NAME"),
    (["--backbone", "tiny"], "give --baseline too"),
    (["--baseline", "image", "--checkpoint", "ckpt", "--pretrained", "w.safetensors"],
     "--pretrained goes with --backbone"),
    (["--baseline", "image", "--backbone", "tiny", "--masks", "m"], "--baseline image encodes whole images"),
    (["--baseline", "text", "--backbone", "tiny", "--runtime", "onnx"], "--runtime onnx"),
    ([], "give --checkpoint CKPT, or --baseline MODE"),
])
def test_index_flags_refuse_bad_combinations_naming_the_flag(tmp_path, capsys, extra, phrase):
    make_gallery(tmp_path / "g", n=2)
    assert main(["index", "--images", str(tmp_path / "g"), "--out", str(tmp_path / "idx")] + extra) == 2
    assert phrase in capsys.readouterr().err
    assert not (tmp_path / "idx").exists()  # refused before anything was written


@pytest.mark.parametrize("command", ["index", "search", "serve"])
def test_an_unknown_mode_is_refused_naming_the_flag(command, tmp_path, capsys):
    args = {"index": ["--images", "g", "--out", "o", "--backbone", "tiny"],
            "search": ["--index", "i", "--image", "x.png", "--text", "t"], "serve": ["--index", "i"]}[command]
    with pytest.raises(SystemExit) as exc:
        main([command, *args, "--baseline", "image-text"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--baseline" in err and "image-text" in err and "image+text" in err
