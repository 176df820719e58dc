"""The atomic-write helpers (offset_cir.io) and the one device rule (offset_cir.device)."""
import json
import os

import numpy as np
import pytest
import torch

from offset_cir import io
from offset_cir.device import choose_device, device_of
from offset_cir.errors import UserInputError


def test_write_helpers_round_trip_and_leave_no_temporary(tmp_path):
    io.write_text(tmp_path / "a.txt", "hé\n")
    io.write_json(tmp_path / "b.json", {"z": 1, "a": [1, 2]}, sort_keys=True)
    io.write_jsonl(tmp_path / "c.jsonl", [{"b": 2, "a": 1}, {"x": None}])
    io.save_npy(tmp_path / "d.npy", np.arange(6, dtype=np.float32).reshape(2, 3))
    io.write_bytes(tmp_path / "e.bin", b"\x00\x01")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "hé\n"
    assert json.loads((tmp_path / "b.json").read_text()) == {"z": 1, "a": [1, 2]}
    assert [json.loads(x) for x in (tmp_path / "c.jsonl").read_text().splitlines()] == [{"a": 1, "b": 2}, {"x": None}]
    assert np.load(tmp_path / "d.npy").tolist() == [[0, 1, 2], [3, 4, 5]]
    assert (tmp_path / "e.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json", "c.jsonl", "d.npy", "e.bin"]


def test_an_error_while_writing_keeps_the_old_file(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old\n")

    def rows():
        yield {"a": 1}
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        io.write_jsonl(target, rows())
    with pytest.raises(TypeError):
        io.write_json(target, {"not json": object()})
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_replace_dir_swaps_whole_folders_and_keeps_the_old_one_on_error(tmp_path):
    target = tmp_path / "last"
    io.replace_dir(target, lambda d: (d / "a").write_text("1"))
    io.replace_dir(target, lambda d: (d / "b").write_text("2"))
    assert [p.name for p in target.iterdir()] == ["b"]

    def fail(d):
        (d / "c").write_text("3")
        raise OSError("no space")

    with pytest.raises(OSError):
        io.replace_dir(target, fail)
    assert [p.name for p in target.iterdir()] == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_choose_device_rule(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device(None) == torch.device("cpu")
    assert choose_device("auto") == torch.device("cpu")
    assert choose_device("cpu") == torch.device("cpu")
    with pytest.raises(UserInputError, match="--device 'cuda'.*CUDA is not available"):
        choose_device("cuda", what="--device")
    with pytest.raises(UserInputError, match="'gpu0'.*not a torch device"):
        choose_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert choose_device("auto") == torch.device("cuda", 3)
    assert choose_device("cuda") == torch.device("cuda", 3)
    assert choose_device("cuda:1") == torch.device("cuda", 1)


def test_device_of():
    assert device_of(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert device_of(torch.nn.ReLU(), default="meta") == torch.device("meta")


def test_read_jsonl_reads_objects_and_names_the_bad_line(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"a": 1}\n\n{"b": [2, 3]}\n', encoding="utf-8")
    assert io.read_jsonl(good) == [{"a": 1}, {"b": [2, 3]}]
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"a": 1}\n{"a": \n', encoding="utf-8")
    with pytest.raises(UserInputError, match=r"broken\.jsonl: line 2 is not JSON"):
        io.read_jsonl(broken)
    scalar = tmp_path / "scalar.jsonl"
    scalar.write_text('{"a": 1}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(UserInputError, match=r"scalar\.jsonl: line 2 is list, expected a JSON object"):
        io.read_jsonl(scalar)
