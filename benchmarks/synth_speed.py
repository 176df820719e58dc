"""Speed of the synthetic benchmark generator (`offset synth`): images per second and disk use.

    python benchmarks/synth_speed.py            # a third of the default counts
    python benchmarks/synth_speed.py --scale 1  # the default counts (what `offset demo` generates)

Prints one row per setting (image size, rendering processes, mask noise).
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from offset_cir.data.synthetic import DEFAULTS, generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1 / 3, help="fraction of the default query counts")
    args = ap.parse_args()
    counts = {k: max(1, round(DEFAULTS[k] * args.scale)) for k in ("n_train", "n_val", "n_test")}
    rows = []
    settings = [(64, 1, 0.0), (64, 2, 0.0), (64, 2, 0.5), (128, 2, 0.0)]
    with tempfile.TemporaryDirectory(prefix="synth_speed_") as tmp:
        for size, workers, noise in settings:
            out = Path(tmp) / f"b{size}_{workers}_{noise}"
            s = generate(out, seed=0, image_size=size, mask_noise=noise, workers=workers, progress=False, **counts)
            n_images = sum(c["images"] for c in s["splits"].values())
            mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2 ** 20
            rows.append((size, workers, noise, n_images, s["seconds"], n_images / s["seconds"], mb))
            shutil.rmtree(out)
    print(f"queries train/val/test = {counts['n_train']}/{counts['n_val']}/{counts['n_test']}, "
          f"cpu_count={os.cpu_count()}")
    print(f"| {'px':>4} | {'workers':>7} | {'mask noise':>10} | {'images':>7} | {'seconds':>7} | {'images/s':>8} | {'MB':>6} |")
    print(f"|{'-' * 6}|{'-' * 9}|{'-' * 12}|{'-' * 9}|{'-' * 9}|{'-' * 10}|{'-' * 8}|")
    for size, workers, noise, n, sec, rate, mb in rows:
        print(f"| {size:>4} | {workers:>7} | {noise:>10.1f} | {n:>7} | {sec:>7.1f} | {rate:>8.0f} | {mb:>6.1f} |")


if __name__ == "__main__":
    main()
