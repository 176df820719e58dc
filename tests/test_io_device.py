"""The atomic-write helpers (offset_cir.io) and the one device rule (offset_cir.device)."""
import json
import re
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


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield 0o640  # what open() gives a new file under it
    finally:
        os.umask(old)


def test_plain_file_mode_is_what_open_gives(tmp_path, umask_027):
    with open(tmp_path / "plain", "w"):
        pass
    assert io.plain_file_mode() == os.stat(tmp_path / "plain").st_mode & 0o7777 == umask_027


def test_files_written_through_io_get_the_mode_open_gives_whoever_wrote_them(tmp_path, umask_027):
    """safetensors' save_file makes a private (0600) temporary of its own and renames it into place: the helpers
    give what they put in place the mode a plain open would (0640 under umask 027, not 0600)."""
    from safetensors.torch import save_file

    tensors = {"w": torch.zeros(3)}
    with io.atomic_path(tmp_path / "a.safetensors") as tmp:
        save_file(tensors, str(tmp))

    def write(folder):
        save_file(tensors, str(folder / "state.safetensors"))
        (folder / "sub").mkdir()
        save_file(tensors, str(folder / "sub" / "deep.safetensors"))
        io.write_json(folder / "meta.json", {"a": 1})

    io.replace_dir(tmp_path / "last", write)
    io.write_bytes(tmp_path / "b.bin", b"x")
    written = [tmp_path / "a.safetensors", tmp_path / "last" / "state.safetensors",
               tmp_path / "last" / "sub" / "deep.safetensors", tmp_path / "last" / "meta.json", tmp_path / "b.bin"]
    assert {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o7777) for p in written} == {
        str(p.relative_to(tmp_path)): oct(umask_027) for p in written}


def test_a_training_checkpoint_folder_has_one_file_mode(tmp_path, umask_027):
    """``last/`` of a run (weights, config, trainer state JSON and tensors) as the trainer writes it."""
    import offset_cir
    from offset_cir.train.state import TrainState, save_training_state

    torch.manual_seed(0)
    model = offset_cir.build_model(offset_cir.ModelConfig(backbone="tiny"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    save_training_state(tmp_path / "last", model, opt, None, {"seed": 0}, TrainState(step=1), world_size=1)
    modes = {p.name: oct(p.stat().st_mode & 0o7777) for p in (tmp_path / "last").iterdir()}
    assert "trainer_state.safetensors" in modes and len(modes) >= 4
    assert modes == {name: oct(umask_027) for name in modes}


def test_read_format_json_refuses_other_formats_and_newer_versions(tmp_path):
    path = tmp_path / "manifest.json"
    io.write_json(path, {"format": "offset-cir-index", "version": 1, "n": 3})
    assert io.read_format_json(path, "offset-cir-index", 1, "index")["n"] == 3
    cases = [({"format": "other", "version": 1}, "not an offset-cir index (field 'format' is 'other'"),
             ([1, 2], "field 'format' is 'list'"),
             ({"format": "offset-cir-index", "version": 2}, "index version 2 is newer than this offset-cir "
                                                            "understands (1)")]
    for data, message in cases:
        io.write_json(path, data)
        with pytest.raises(UserInputError, match=re.escape(message)):
            io.read_format_json(path, "offset-cir-index", 1, "index")
    path.write_text("{not json")
    with pytest.raises(UserInputError, match="manifest.json is not valid JSON"):
        io.read_format_json(path, "offset-cir-index", 1, "index")
