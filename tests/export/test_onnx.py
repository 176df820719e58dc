"""`offset export`: ONNX graphs that compute what the torch model computes, described by export.json."""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)
ort = pytest.importorskip("onnxruntime", reason="the 'export' extra (onnxruntime) is not installed")
pytest.importorskip("onnx", reason="the 'export' extra (onnx) is not installed")

import offset_cir  # noqa: E402
from offset_cir.cli import main as cli_main  # noqa: E402
from offset_cir.errors import UserInputError  # noqa: E402
from offset_cir.export.onnx import TOLERANCE, export_onnx  # noqa: E402
from offset_cir.export.runtime import OnnxEncoder  # noqa: E402

TEXTS = ["a red dress", "make it longer, with blue stripes and no sleeves", "same", "the dog is now a cat on a sofa",
         "x"]


def _random_inputs(model, batch: int, seed: int):
    """Random images and masks; tokens of real texts of different lengths (EOT at different positions)."""
    g = torch.Generator().manual_seed(seed)
    s = model.preprocess.image_size
    texts = [TEXTS[i % len(TEXTS)] for i in range(batch)]
    return torch.randn(batch, 3, s, s, generator=g), torch.randn(batch, 3, s, s, generator=g), texts


def _ort_session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _check_against_torch(model, out: Path, batches=(1, 4)):
    """Both graphs, run directly in onnxruntime, equal torch within TOLERANCE for several batch sizes."""
    meta = json.loads((out / "export.json").read_text())
    q_names = [i["name"] for i in meta["graphs"]["query"]["inputs"]]
    t_names = [i["name"] for i in meta["graphs"]["target"]["inputs"]]
    q_sess, t_sess = _ort_session(out / "query.onnx"), _ort_session(out / "target.onnx")
    assert [i.name for i in q_sess.get_inputs()] == q_names
    assert [i.name for i in t_sess.get_inputs()] == t_names
    worst = 0.0
    for seed, b in enumerate(batches):
        images, masks, texts = _random_inputs(model, b, seed)
        tokens = model.tokenize(texts)
        feed = {"images": images.numpy(), "masks": masks.numpy(), "tokens": tokens.numpy()}
        use_q = masks if "masks" in q_names else None
        use_t = masks if "masks" in t_names else None
        with torch.inference_mode():
            want_q = model.encode_query(images, use_q, tokens).numpy()
            want_t = model.encode_target(images, use_t).numpy()
        got_q = q_sess.run(None, {n: feed[n] for n in q_names})[0]
        got_t = t_sess.run(None, {n: feed[n] for n in t_names})[0]
        assert got_q.shape == got_t.shape == (b, model.embed_dim)
        np.testing.assert_allclose(np.linalg.norm(got_q, axis=1), 1.0, atol=1e-5)
        worst = max(worst, float(np.abs(got_q - want_q).max()), float(np.abs(got_t - want_t).max()))
    assert worst <= TOLERANCE
    return meta, worst


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = offset_cir.build_model(offset_cir.ModelConfig(backbone="tiny")).eval()
    return offset_cir.save_checkpoint(model, tmp_path_factory.mktemp("tiny") / "ckpt")


def test_cli_export_tiny_matches_torch_and_describes_itself(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "onnx"
    assert cli_main(["export", "--checkpoint", str(tiny_ckpt), "--out", str(out)]) == 0
    assert "query.onnx" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "query.onnx", "target.onnx"]
    model = offset_cir.load_checkpoint(tiny_ckpt).eval()
    meta, _ = _check_against_torch(model, out, batches=(1, 5))

    s, length = model.preprocess.image_size, model.backbone.dims.context_length
    q, t = meta["graphs"]["query"], meta["graphs"]["target"]
    assert [(i["name"], i["shape"], i["dtype"]) for i in q["inputs"]] == [
        ("images", ["batch", 3, s, s], "float32"), ("masks", ["batch", 3, s, s], "float32"),
        ("tokens", ["batch", length], "int64")]
    assert [i["name"] for i in t["inputs"]] == ["images", "masks"]
    assert q["output"]["shape"] == ["batch", model.embed_dim] and q["output"]["l2_normalised"] is True
    # the batch dimension is symbolic in the graph itself
    sess = _ort_session(out / "query.onnx")
    assert all(isinstance(i.shape[0], str) for i in sess.get_inputs())
    assert sess.get_inputs()[0].shape[1:] == [3, s, s]
    # preprocessing and tokenizer, as the model does them
    pre = meta["preprocess"]
    assert pre["image_size"] == s and pre["interpolation"] == "bicubic"
    np.testing.assert_allclose(pre["mean"], model.preprocess.mean)
    np.testing.assert_allclose(pre["std"], model.preprocess.std)
    assert meta["tokenizer"]["context_length"] == length
    ex = meta["tokenizer"]["example"]
    assert ex["tokens"] == model.tokenize([ex["text"]])[0].tolist()
    # the checkpoint hash, computed independently: sha256 of the weights file
    want = "sha256:" + hashlib.sha256((Path(tiny_ckpt) / "model.safetensors").read_bytes()).hexdigest()
    assert meta["checkpoint"]["hash"] == want
    assert meta["versions"]["onnxruntime"] == ort.__version__
    assert meta["versions"]["torch"] == importlib.metadata.version("torch")
    assert meta["model_config"]["backbone"] == "tiny" and meta["exporter"] == "torchscript"
    assert meta["check"]["max_abs_diff"]["query"] <= TOLERANCE


def test_encoder_matches_model_on_texts(tiny_ckpt, tmp_path):
    """OnnxEncoder (the runtime the index and service use) takes texts like the model and tokenizes the same."""
    model = offset_cir.load_checkpoint(tiny_ckpt).eval()
    export_onnx(model, tmp_path / "onnx")
    enc = OnnxEncoder(tmp_path / "onnx", threads=1)
    images, masks, texts = _random_inputs(model, 3, 7)
    with torch.inference_mode():
        want_q = model.encode_query(images, masks, texts)
        want_t = model.encode_target(images, masks)
    assert torch.equal(enc.tokenize(texts), model.tokenize(texts))
    assert (enc.encode_query(images, masks, texts) - want_q).abs().max() <= TOLERANCE
    assert (enc.encode_target(images, masks) - want_t).abs().max() <= TOLERANCE
    assert enc.embed_dim == model.embed_dim and enc.uses_masks and enc.uses_query_mask and enc.uses_target_mask
    with pytest.raises(ValueError, match="masks are required"):
        enc.encode_query(images, None, texts)


@pytest.mark.parametrize("ablation, query_inputs, target_inputs", [
    ("wo_fm", ["images", "tokens"], ["images"]),
    ("wo_target_vfm", ["images", "masks", "tokens"], ["images"]),
])
def test_graphs_without_masks(ablation, query_inputs, target_inputs, tmp_path):
    """A model trained without masks exports without the masks input (each side as its model side needs)."""
    model = offset_cir.build_model(offset_cir.ModelConfig(backbone="tiny").with_ablation(ablation)).eval()
    export_onnx(model, tmp_path / "onnx")
    meta, _ = _check_against_torch(model, tmp_path / "onnx", batches=(2,))
    assert [i["name"] for i in meta["graphs"]["query"]["inputs"]] == query_inputs
    assert [i["name"] for i in meta["graphs"]["target"]["inputs"]] == target_inputs
    enc = OnnxEncoder(tmp_path / "onnx")
    images, _, texts = _random_inputs(model, 2, 3)
    with torch.inference_mode():
        want = model.encode_target(images, None)
    assert (enc.encode_target(images, None) - want).abs().max() <= TOLERANCE
    assert enc.uses_target_mask is False and enc.uses_masks is (ablation != "wo_fm")


def test_refuses_non_empty_out_unless_overwrite(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert cli_main(["export", "--checkpoint", str(tiny_ckpt), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err and "Traceback" not in err
    assert (out / "mine.txt").read_text() == "keep me" and sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    (tmp_path / "file").write_text("x")
    assert cli_main(["export", "--checkpoint", str(tiny_ckpt), "--out", str(tmp_path / "file")]) == 2
    assert cli_main(["export", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")]) == 2
    assert not (tmp_path / "o2").exists()
    # --overwrite replaces an earlier export, never the user's other files
    assert cli_main(["export", "--checkpoint", str(tiny_ckpt), "--out", str(out), "--overwrite"]) == 2
    assert "not an export" in capsys.readouterr().err and (out / "mine.txt").read_text() == "keep me"
    (out / "mine.txt").unlink()
    assert cli_main(["export", "--checkpoint", str(tiny_ckpt), "--out", str(out)]) == 0
    assert cli_main(["export", "--checkpoint", str(tiny_ckpt), "--out", str(out)]) == 2
    (out / "export.json").write_text('{"sentinel": 1}')  # so that "written anew" is visible
    assert cli_main(["export", "--checkpoint", str(tiny_ckpt), "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "query.onnx", "target.onnx"]
    assert "sentinel" not in (out / "export.json").read_text()
    # an empty folder is fine without --overwrite
    (tmp_path / "empty").mkdir()
    assert cli_main(["export", "--checkpoint", str(tiny_ckpt), "--out", str(tmp_path / "empty")]) == 0


def test_failed_export_leaves_the_old_folder(tiny_ckpt, tmp_path, monkeypatch):
    from offset_cir.export import onnx as onnx_mod

    out = tmp_path / "onnx"
    model = offset_cir.load_checkpoint(tiny_ckpt)
    export_onnx(model, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def broken(module, args, names, path, exporter, opset):
        calls.append(path.name)
        if len(calls) == 2:  # the target graph, after the query graph was written
            raise RuntimeError("disk full")
        return real(module, args, names, path, exporter, opset)

    real = onnx_mod._export_graph
    monkeypatch.setattr(onnx_mod, "_export_graph", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_onnx(model, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]  # no staging folder left behind


def test_small_vit_matches_torch(tmp_path):
    """A second ViT shape (96 px, patch 16, other widths and context length)."""
    model = offset_cir.build_model(offset_cir.ModelConfig(backbone="small")).eval()
    export_onnx(model, tmp_path / "onnx")
    _check_against_torch(model, tmp_path / "onnx", batches=(1, 3))


@pytest.mark.slow
def test_dynamo_exporter_also_exact(tmp_path):
    pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
    model = offset_cir.build_model(offset_cir.ModelConfig(backbone="tiny")).eval()
    rep = export_onnx(model, tmp_path / "onnx", exporter="dynamo")
    assert rep.meta["exporter"] == "dynamo"
    _check_against_torch(model, tmp_path / "onnx", batches=(1, 3))


@pytest.mark.slow
def test_vit_b_32_random_init_matches_torch(tmp_path):
    model = offset_cir.build_model(offset_cir.ModelConfig(backbone="ViT-B-32")).eval()
    export_onnx(model, tmp_path / "onnx")
    _check_against_torch(model, tmp_path / "onnx", batches=(1, 2))


def test_int8_graphs(tiny_ckpt, tmp_path):
    """--int8 adds quantised graphs: same inputs and outputs, unit-length features, near the fp32 ones."""
    out = tmp_path / "onnx"
    assert cli_main(["export", "--checkpoint", str(tiny_ckpt), "--out", str(out), "--int8"]) == 0
    meta = json.loads((out / "export.json").read_text())
    assert meta["graphs"]["query"]["int8_file"] == "query.int8.onnx"
    model = offset_cir.load_checkpoint(tiny_ckpt).eval()
    fp32, int8 = OnnxEncoder(out), OnnxEncoder(out, int8=True)
    images, masks, texts = _random_inputs(model, 4, 1)
    a, b = fp32.encode_query(images, masks, texts), int8.encode_query(images, masks, texts)
    np.testing.assert_allclose(b.norm(dim=1).numpy(), 1.0, atol=1e-5)
    assert not torch.equal(a, b)  # it is another graph
    assert ((a * b).sum(dim=1) > 0.9).all()  # cosine to fp32: int8 weights move features, not scramble them
    assert int8.runtime_info["int8"] is True and fp32.runtime_info["int8"] is False
    export_onnx(model, tmp_path / "plain")
    with pytest.raises(UserInputError, match="--int8"):
        OnnxEncoder(tmp_path / "plain", int8=True)


def _packaged_available() -> bool:
    try:
        from offset_cir.model.towers import available_backbones

        return "efficientnet-lite0-minilm" in available_backbones()
    except Exception:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _packaged_available(), reason="backbone efficientnet-lite0-minilm is not available")
def test_efficientnet_lite0_minilm_matches_torch(tmp_path):
    model = offset_cir.build_model(offset_cir.ModelConfig(backbone="efficientnet-lite0-minilm")).eval()
    export_onnx(model, tmp_path / "onnx")
    meta, _ = _check_against_torch(model, tmp_path / "onnx", batches=(1, 3))
    assert meta["tokenizer"]["context_length"] == model.tokenize(["a"]).shape[1]
    enc = OnnxEncoder(tmp_path / "onnx")
    images, masks, texts = _random_inputs(model, 2, 5)
    with torch.inference_mode():
        want = model.encode_query(images, masks, texts)
    assert (enc.encode_query(images, masks, texts) - want).abs().max() <= TOLERANCE


def test_a_graph_that_does_not_reproduce_the_model_is_not_written(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """The export is checked against torch at another batch size than it was traced at; a disagreement is an error
    (nothing written), not a warning followed by a folder that would serve wrong rankings."""
    from offset_cir.export import onnx as onnx_mod

    real = onnx_mod._ort_run
    monkeypatch.setattr(onnx_mod, "_ort_run", lambda *a, **k: real(*a, **k) + 1e-2)
    out = tmp_path / "onnx"
    assert cli_main(["export", "--checkpoint", str(tiny_ckpt), "--out", str(out)]) == 2
    assert "does not reproduce the model" in capsys.readouterr().err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".onnx")]
