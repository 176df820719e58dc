"""Peak resident memory of a call, read from Linux's ``/proc/self``.

PIL and torch allocate image and tensor buffers with their own allocators (C ``malloc``/``posix_memalign``), which
``tracemalloc`` does not see; the kernel's resident-set counters see every page that was touched. The peak
(``VmHWM``) is reset before the call by writing ``5`` to ``/proc/self/clear_refs`` (Linux 4.0 and later), so the
growth measured is that of the call alone, in this process.
"""
from __future__ import annotations

import gc
from pathlib import Path
from typing import Callable

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # the kernel reports kB
    raise RuntimeError(f"{_STATUS} has no {field} line")


def peak_measurable() -> bool:
    """Whether this process can reset and read its peak resident size (Linux with /proc)."""
    try:
        _CLEAR_REFS.write_text("5")
        _status_bytes("VmHWM")
    except (OSError, RuntimeError):
        return False
    return True


def peak_growth(fn: Callable, *args, **kwargs) -> tuple[object, int]:
    """``(fn(*args, **kwargs), bytes)``: how far the resident size rose above its level before the call, at its peak."""
    gc.collect()
    _CLEAR_REFS.write_text("5")  # peak := current resident size
    before = _status_bytes("VmRSS")
    result = fn(*args, **kwargs)
    return result, _status_bytes("VmHWM") - before


_CLI_PEAK = """
import sys
import torch
from offset_cir.cli import main
torch.set_num_threads(1)
code = main(sys.argv[1:])
peak = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
print("\\nVmHWM-kB", peak, file=sys.stderr)
sys.exit(code)
"""


def cli_peak(argv: list[str], timeout: float = 300.0) -> tuple[int, int, str]:
    """Run ``offset <argv>`` in a fresh Python process: ``(exit code, peak resident bytes, stderr)``.

    A fresh process allocates the same way on every run, so two runs that differ in one input differ in peak by
    what that input costs (within a few hundred kB)."""
    import os
    import subprocess
    import sys

    import offset_cir

    here = str(Path(offset_cir.__file__).resolve().parents[1])  # this copy of the package, not an installed one
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run([sys.executable, "-c", _CLI_PEAK, *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    lines = [line for line in done.stderr.splitlines() if line.startswith("VmHWM-kB ")]
    if not lines:
        raise RuntimeError(f"offset {' '.join(map(str, argv))} ended without reporting its peak "
                           f"(exit {done.returncode}): {done.stderr[-2000:]}")
    return done.returncode, int(lines[-1].split()[1]) * 1024, done.stderr
