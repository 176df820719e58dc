"""`offset index` under torchrun: two CPU processes (gloo) split the encoding, rank 0 merges the shards; the result
equals a single-process index."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from offset_cir.testing.search import make_gallery  # noqa: E402

pytest.importorskip("offset_cir.model.offset", reason="the OFFSET model module is not available")
import offset_cir  # noqa: E402
from offset_cir.search import Index, build_index  # noqa: E402

torch.set_num_threads(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # three process start-ups with torch + open_clip imports: 25-60 s on a loaded 2-core machine
def test_torchrun_two_processes_equal_one(tmp_path):
    root = tmp_path / "g"
    make_gallery(root, n=22, size=64)
    torch.manual_seed(0)
    ckpt = offset_cir.save_checkpoint(offset_cir.build_model(offset_cir.ModelConfig(backbone="tiny")), tmp_path / "ck")
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "offset_cir.cli", "index", "--checkpoint", str(ckpt),
           "--images", str(root), "--out", str(tmp_path / "dist"), "--workers", "0", "--shard-size", "4",
           "--batch-size", "4"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    log = res.stdout + res.stderr
    assert "2 process(es)" in log and "encode[0]" in log and "encode[1]" in log  # both ranks encoded
    assert res.stdout.count("22 images (22 encoded now") == 1  # only rank 0 merges and reports
    build_index(tmp_path / "one", root, checkpoint=ckpt, progress=False, device="cpu", distributed=False)
    a, b = Index.open(tmp_path / "one"), Index.open(tmp_path / "dist")
    assert a.ids == b.ids and a.manifest["checkpoint"] == b.manifest["checkpoint"]
    np.testing.assert_allclose(np.asarray(a.features, np.float32), np.asarray(b.features, np.float32), atol=2e-3)
    assert not list((tmp_path / "dist" / "shards").iterdir())
