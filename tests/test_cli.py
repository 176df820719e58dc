"""The command table: each command module is the one place its name and help are written."""
from __future__ import annotations

import argparse
import pkgutil
import subprocess
import sys

import pytest

import offset_cir.commands
from offset_cir import cli


def test_every_command_module_is_listed_once_with_its_own_name_and_help():
    modules = {m.name for m in pkgutil.iter_modules(offset_cir.commands.__path__) if not m.name.startswith("_")}
    assert sorted(cli.COMMAND_MODULES) == sorted(modules)  # a new module is on the command line, or this fails
    names = [name for name, _, _ in cli.COMMANDS]
    assert len(set(names)) == len(names)
    for name, module, help_text in cli.COMMANDS:
        mod = cli._load(module)
        assert (mod.NAME, mod.HELP) == (name, help_text) and help_text.strip()
        assert callable(mod.add_arguments) and callable(mod.run), module


def test_top_level_help_shows_each_modules_help(capsys):
    assert cli.main([]) == 2
    out = capsys.readouterr().out
    sub = next(a for a in cli.build_parser([])._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == [cli._load(m).NAME for m in cli.COMMAND_MODULES]
    flat = " ".join(out.split())
    for module in cli.COMMAND_MODULES:
        assert " ".join(cli._load(module).HELP.split()) in flat


def test_reading_the_command_table_imports_no_heavy_package():
    """`offset --help` reads every command module: none may import torch (or an optional extra) at its top."""
    code = ("import sys; from offset_cir import cli; cli.build_parser([]); "
            "heavy = sorted(m for m in ('torch', 'numpy', 'PIL', 'yaml', 'transformers', 'open_clip', 'faiss', "
            "'fastapi', 'onnxruntime') if m in sys.modules); print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_full_disk_is_a_clear_error_not_a_traceback(monkeypatch, capsys):
    import errno

    from offset_cir.commands import info

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "runs/demo/seed0/offset/best/model.safetensors")

    monkeypatch.setattr(info, "run", full)
    assert cli.main(["info"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the disk is full writing runs/demo/seed0/offset/best/model.safetensors")
    assert "Traceback" not in err

    def other(args):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(info, "run", other)
    with pytest.raises(PermissionError):  # any other OS error is not disguised
        cli.main(["info"])
