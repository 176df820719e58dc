"""The index and the service on onnxruntime: the same rankings as torch on the synthetic test images."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)
pytest.importorskip("onnxruntime", reason="the 'export' extra (onnxruntime) is not installed")

import offset_cir  # noqa: E402
from offset_cir.cli import main as cli_main  # noqa: E402
from offset_cir.errors import CheckpointError, OffsetError  # noqa: E402
from offset_cir.export.onnx import export_checkpoint  # noqa: E402
from offset_cir.export.runtime import OnnxEncoder, load_encoder  # noqa: E402
from offset_cir.search import Index, build_index  # noqa: E402

from offset_cir.testing.search import train_tiny_on_synthetic  # noqa: E402

KW = dict(progress=False, device="cpu", distributed=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Synthetic benchmark (8 test queries, 48 test images), a tiny OFFSET trained 3 steps, its ONNX export."""
    base = tmp_path_factory.mktemp("onnxrt")
    root, ckpt, _ = train_tiny_on_synthetic(base)
    export_checkpoint(ckpt, base / "onnx")
    torch_index = base / "idx-torch"
    build_index(torch_index, root / "test", checkpoint=ckpt, dtype="float32", **KW)
    return base, root, ckpt, base / "onnx", torch_index


def _test_queries(root: Path):
    recs = json.loads((root / "captions" / "cap.rc2.test.json").read_text())
    split = json.loads((root / "image_splits" / "split.rc2.test.json").read_text())
    out = []
    for rec in recs:
        p = (root / split[rec["reference"]]).resolve()
        out.append((rec["reference"], p, p.with_name(p.stem + "-segmask.png"), rec["caption"]))
    return out


def test_search_same_top5_on_either_runtime(trained):
    """An index built by torch, searched with torch and with onnxruntime: the same top-5 for every test query."""
    base, root, ckpt, onnx_dir, torch_index = trained
    a = Index.open(torch_index)
    b = Index.open(torch_index, runtime="onnx", onnx_dir=onnx_dir)
    assert isinstance(b.model, OnnxEncoder) and not isinstance(a.model, OnnxEncoder)
    queries = _test_queries(root)
    assert len(queries) == 8
    for ref_id, ref, mask, text in queries:
        qa, qb = a.encode_query(ref, text, mask), b.encode_query(ref, text, mask)
        assert np.abs(qa - qb).max() <= 1e-4
        ha, hb = a.search(ref, text, k=5, mask=mask), b.search(ref, text, k=5, mask=mask)
        assert [h.id for h in ha] == [h.id for h in hb]
        np.testing.assert_allclose([h.score for h in ha], [h.score for h in hb], atol=1e-4)
        assert [h.id for h in a.search_id(ref_id, text, 5)] == [h.id for h in b.search_id(ref_id, text, 5)]
    # without --onnx: the checkpoint recorded in the index is exported on the fly
    c = Index.open(torch_index, runtime="onnx")
    ref_id, ref, mask, text = queries[0]
    assert [h.id for h in c.search(ref, text, 5, mask=mask)] == [h.id for h in a.search(ref, text, 5, mask=mask)]


def test_cli_index_on_onnx_equals_torch(trained, tmp_path, capsys):
    """`offset index --runtime onnx`: the same features (float tolerance) and rankings; the manifest says so."""
    base, root, ckpt, onnx_dir, torch_index = trained
    out = tmp_path / "idx-onnx"
    assert cli_main(["index", "--checkpoint", str(ckpt), "--images", str(root / "test"), "--out", str(out),
                     "--workers", "0", "--dtype", "float32", "--runtime", "onnx", "--onnx", str(onnx_dir)]) == 0
    assert "48 images (48 encoded now" in capsys.readouterr().out
    a, b = Index.open(torch_index), Index.open(out)
    assert a.ids == b.ids and a.manifest["checkpoint"]["hash"] == b.manifest["checkpoint"]["hash"]
    np.testing.assert_allclose(np.asarray(b.features), np.asarray(a.features), atol=1e-5)
    assert b.manifest["runtime"]["runtime"] == "onnx" and b.manifest["runtime"]["int8"] is False
    assert a.manifest["runtime"] == {"runtime": "torch"}
    for _, ref, mask, text in _test_queries(root):
        assert [h.id for h in a.search(ref, text, 5, mask=mask)] == [h.id for h in b.search(ref, text, 5, mask=mask)]


def test_export_of_another_checkpoint_is_refused(trained, tmp_path):
    base, root, ckpt, onnx_dir, torch_index = trained
    torch.manual_seed(1)
    other = offset_cir.save_checkpoint(offset_cir.build_model(offset_cir.ModelConfig(backbone="tiny")),
                                       tmp_path / "other")
    export_checkpoint(other, tmp_path / "other-onnx")
    with pytest.raises(CheckpointError, match="index was built with"):
        Index.open(torch_index, runtime="onnx", onnx_dir=tmp_path / "other-onnx")
    with pytest.raises(CheckpointError, match="hashes to"):  # an export and a checkpoint that do not belong together
        load_encoder(ckpt, "onnx", onnx_dir=tmp_path / "other-onnx")
    assert cli_main(["index", "--checkpoint", str(ckpt), "--images", str(root / "test"), "--out",
                     str(tmp_path / "idx"), "--runtime", "onnx", "--onnx", str(tmp_path / "other-onnx")]) == 2
    assert not (tmp_path / "idx").exists()


def test_service_on_onnx_returns_torch_ranking(trained):
    from fastapi.testclient import TestClient

    from offset_cir.search.service import create_app

    base, root, ckpt, onnx_dir, torch_index = trained
    ref_id, ref, mask, text = _test_queries(root)[1]
    want = [h.id for h in Index.open(torch_index).search(ref, text, 5, mask=mask)]
    index = Index.open(torch_index, runtime="onnx", onnx_dir=onnx_dir)
    with TestClient(create_app(index), base_url="http://localhost") as c:
        r = c.post("/search", data={"text": text, "k": "5"},
                   files={"image": ("r.png", ref.read_bytes(), "image/png"),
                          "mask": ("m.png", mask.read_bytes(), "image/png")})
        assert r.status_code == 200, r.text
        assert [x["id"] for x in r.json()["results"]] == want
    # the container's HEALTHCHECK: a service bound to 0.0.0.0, asked on 127.0.0.1:8000
    import inspect

    bound = {"host": "0.0.0.0"} if "host" in inspect.signature(create_app).parameters else {}
    with TestClient(create_app(index, **bound), base_url="http://127.0.0.1:8000") as c:
        h = c.get("/health")
        assert h.status_code == 200 and h.json()["runtime"] == "onnx"


def test_serve_cli_passes_the_runtime(trained, monkeypatch):
    """`offset serve --runtime onnx --onnx DIR` opens the index on onnxruntime (stopped before binding a port)."""
    base, root, ckpt, onnx_dir, torch_index = trained
    seen = {}
    real_open = Index.open.__func__

    def opening(cls, path, **kwargs):
        seen.update(kwargs)
        idx = real_open(cls, path, **kwargs)
        seen["model"] = idx.model
        raise OffsetError("stop here")

    monkeypatch.setattr(Index, "open", classmethod(opening))
    assert cli_main(["serve", "--index", str(torch_index), "--runtime", "onnx", "--onnx", str(onnx_dir)]) == 2
    assert seen["runtime"] == "onnx" and Path(seen["onnx_dir"]) == onnx_dir
    assert isinstance(seen["model"], OnnxEncoder)
    seen.clear()
    assert cli_main(["serve", "--index", str(torch_index)]) == 2
    assert seen["runtime"] == "torch" and not isinstance(seen["model"], OnnxEncoder)


def _dockerfile_json(instruction: str) -> list[str]:
    text = (Path(__file__).resolve().parents[2] / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith(instruction + " ")]
    assert len(lines) == 1, f"one {instruction} expected in the Dockerfile"
    return json.loads(lines[0][len(instruction) + 1:])


def test_container_entrypoint_is_a_valid_serve_command():
    """The image's ENTRYPOINT + CMD parse as `offset serve` does today: bound to 0.0.0.0 (reachable through the
    published port), the port the HEALTHCHECK asks, a non-root user."""
    from offset_cir.cli import build_parser

    entry, cmd = _dockerfile_json("ENTRYPOINT"), _dockerfile_json("CMD")
    assert entry[:2] == ["offset", "serve"]
    argv = entry[1:] + cmd
    args = build_parser(argv).parse_args(argv)
    assert args.host == "0.0.0.0" and args.index == "/index" and args.runtime == "torch"
    health = (Path(__file__).resolve().parents[2] / "Dockerfile").read_text()
    assert f"http://127.0.0.1:{args.port}/health" in health
    onnx_argv = entry[1:] + ["--index", "/index", "--runtime", "onnx", "--onnx", "/onnx"]
    assert build_parser(onnx_argv).parse_args(onnx_argv).onnx == "/onnx"
    user = [ln.split()[1] for ln in health.splitlines() if ln.startswith("USER ")]
    assert user and all(u.split(":")[0] not in ("0", "root") for u in user)
