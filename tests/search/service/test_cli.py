"""`offset serve` as a real process on 127.0.0.1 (a free port), queried over HTTP, then stopped."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("offset_cir.model.offset", reason="the OFFSET model module is not available")
from offset_cir.testing.search import make_gallery  # noqa: E402

import offset_cir  # noqa: E402
from offset_cir.commands.serve import _is_loopback  # noqa: E402
from offset_cir.search import Index, build_index  # noqa: E402


def test_is_loopback():
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("192.168.1.4") and not _is_loopback("example.org")


def test_offset_serve_process(tmp_path):
    root = tmp_path / "g"
    make_gallery(root, n=8, size=64)
    torch.manual_seed(0)
    ckpt = offset_cir.save_checkpoint(offset_cir.build_model(offset_cir.ModelConfig(backbone="tiny")), tmp_path / "ck")
    build_index(tmp_path / "idx", root, checkpoint=ckpt, progress=False, device="cpu", distributed=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "offset_cir.cli", "serve", "--index", str(tmp_path / "idx"),
                             "--port", str(port), "--device", "cpu"],
                            env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    client = httpx.Client(trust_env=False)  # straight to loopback, whatever proxy the environment names
    try:
        health = None
        for _ in range(300):  # bounded: at most ~60 s for the process to import torch and load the model
            if proc.poll() is not None:
                break
            try:
                health = client.get(base + "/health", timeout=2).json()
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert health is not None, proc.communicate(timeout=10)[0][-3000:]
        assert health["images"] == 8 and health["search"] == "exact"
        # --precision auto (the default) calibrated at start-up and says what it chose
        precision = health["precision"]
        assert precision["requested"] == "auto" and precision["precision"] in ("fp32", "bf16")
        assert precision["cosine"] >= 0.999 and precision["fp32_seconds"] > 0 and precision["bf16_seconds"] > 0
        r = client.post(base + "/search", data={"text": "make it red", "k": "3", "ref_id": "img001"}, timeout=30)
        assert r.status_code == 200, r.text
        want = Index.open(tmp_path / "idx", precision=precision["precision"]).search_id("img001", "make it red", k=3)
        assert [x["id"] for x in r.json()["results"]] == [h.id for h in want]
        assert client.get(base + "/images/..%2Fck%2Fconfig.json", timeout=5).status_code == 404
        rebound = client.get(base + "/health", headers={"host": f"rebind.example:{port}"}, timeout=5)
        assert rebound.status_code == 400 and "content-security-policy" in rebound.headers
    finally:
        client.close()
        proc.send_signal(signal.SIGINT)
        try:
            out = proc.communicate(timeout=20)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            out = proc.communicate(timeout=10)[0]
    assert f"on http://127.0.0.1:{port}/" in out
    assert f"queries: precision {precision['precision']} (auto: " in out
    assert f"loading checkpoint {ckpt}" in out and f"loaded checkpoint {ckpt} in " in out  # not 13 s of silence
