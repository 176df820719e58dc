"""What the frozen packaged image tower tells about the synthetic dominant object: linear-probe accuracy per attribute.

    python benchmarks/feature_probe.py                  # generates a small benchmark in a temporary folder
    python benchmarks/feature_probe.py --data data/synthetic-demo --sizes 64 128
    python benchmarks/feature_probe.py --data data/synthetic-demo --sizes 64 --blocks 1 4 6 9 12

The demo (`offset demo`) trains OFFSET over the frozen ImageNet EfficientNet-Lite0 of `efficientnet-lite0-minilm`:
whatever the tower's final feature map does not hold about the dominant object, OFFSET's new modules cannot add.
For each input side (the 64 px images resized), a linear classifier per attribute (shape, colour, size, pattern)
is fitted on the train images' features and scored on the test images. Rows: the final feature map average-pooled
(what the tower's own pooled feature sees), the same map pooled under the dominant object's mask (its grid cells
weighted by the mask's share of each), and, as the reference of what the pixels hold, the mask-weighted mean RGB
plus the mask's area (no network). "all four" is the share of test images with every attribute right: a target
is among the top few of a 3000-image gallery only when the query gets roughly all four right. ``--blocks N ...``
adds the same two rows for the input of the tower's last N blocks (what ``trainable_image_blocks=N`` with the
feature cache stores and then trains on): how much of each attribute the layers before them still hold.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ATTRS = ("shape", "colour", "size", "pattern")


def _arrays(root: Path, names: list[str], images: dict, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    pix, masks = [], []
    for name in names:
        split = images[name]["split"]
        img = Image.open(root / split / f"{name}.png").convert("RGB")
        mask = Image.open(root / split / f"{name}-segmask.png").convert("L")
        if img.size != (side, side):
            img = img.resize((side, side), Image.BICUBIC)
            mask = mask.resize((side, side), Image.BILINEAR)
        pix.append(np.asarray(img, dtype=np.float32) / 255.0)
        masks.append(np.asarray(mask, dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(pix)).permute(0, 3, 1, 2), torch.from_numpy(np.stack(masks))[:, None]


def _maps(trunk, x: torch.Tensor, cuts: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """The final feature map (key 0) and the input of the last N blocks for each N of ``cuts``."""
    flat = [b for stage in trunk.blocks for b in stage]
    maps = {}
    h = trunk.bn1(trunk.conv_stem(x))
    for i, block in enumerate(flat):
        if len(flat) - i in cuts:
            maps[len(flat) - i] = h
        h = block(h)
    maps[0] = trunk.bn2(trunk.conv_head(h))
    return maps


def features(trunk, root: Path, names: list[str], images: dict, side: int, batch: int = 128,
             cuts: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    """Per image: the final map average-pooled, mask-pooled, and the pixel reference (mean RGB under the mask, area);
    for each N of ``cuts`` the input of the last N blocks, average- and mask-pooled ("avg@N", "mask@N")."""
    out: dict[str, list[torch.Tensor]] = {"avg": [], "mask": [], "pixels": []}
    for i in range(0, len(names), batch):
        x, m = _arrays(root, names[i:i + batch], images, side)
        with torch.no_grad():
            maps = _maps(trunk, (x - 0.5) / 0.5, cuts)  # the packaged tower's normalisation (mean 0.5, std 0.5)
        for cut, f in maps.items():
            w = F.adaptive_avg_pool2d(m, f.shape[-2:])
            tag = f"@{cut}" if cut else ""
            out.setdefault(f"avg{tag}", []).append(f.mean((2, 3)))
            out.setdefault(f"mask{tag}", []).append((f * w).sum((2, 3)) / w.sum((2, 3)).clamp_min(1e-6))
        area = m.mean((2, 3))
        out["pixels"].append(torch.cat([(x * m).sum((2, 3)) / m.sum((2, 3)).clamp_min(1e-6), area], 1))
    return {k: torch.cat(v) for k, v in out.items()}


def _grid(trunk, side: int, kind: str) -> int:
    """The side of the map a probe row reads (the final map or the input of the last N blocks)."""
    cut = int(kind.split("@")[1]) if "@" in kind else 0
    with torch.no_grad():
        return _maps(trunk, torch.zeros(1, 3, side, side), (cut,) if cut else ())[cut].shape[-1]


def probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, n_classes: int,
          steps: int = 300) -> torch.Tensor:
    """Predicted classes of ``test_x`` by a softmax-regression fitted on standardised ``train_x`` (seeded)."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mu) / sd, (test_x - mu) / sd
    torch.manual_seed(0)
    lin = torch.nn.Linear(a.shape[1], n_classes)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(lin(a), train_y).backward()
        opt.step()
    with torch.no_grad():
        return lin(b).argmax(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="a synthetic benchmark folder (default: generate one in a temporary folder)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128], help="input sides in pixels")
    ap.add_argument("--n-train", type=int, default=3000, help="train images probed")
    ap.add_argument("--n-test", type=int, default=1000, help="test images scored")
    ap.add_argument("--blocks", type=int, nargs="*", default=[],
                    help="also probe the input of the last N blocks, for each N given (default: none)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from offset_cir.data.synthetic import generate, load_meta
    from offset_cir.model.packaged import create_packaged_clip

    with tempfile.TemporaryDirectory(prefix="feature_probe_") as tmp:
        root = Path(args.data) if args.data else Path(tmp) / "bench"
        if not args.data:
            generate(root, seed=0, n_train=args.n_train // 2, n_val=10, n_test=args.n_test // 6 + 1, progress=False)
        meta = load_meta(root)
        images, vocab = meta["images"], meta["vocab"]
        train = [n for n, v in images.items() if v["split"] == "train"][: args.n_train]
        test = [n for n, v in images.items() if v["split"] == "test"][: args.n_test]
        labels = {split: {a: torch.tensor([vocab[a].index(images[n][a]) for n in names]) for a in ATTRS}
                  for split, names in (("train", train), ("test", test))}
        trunk = create_packaged_clip("efficientnet-lite0-minilm").visual.trunk.eval()
        rows = []
        for side in args.sizes:
            t0 = time.perf_counter()
            cuts = tuple(args.blocks)
            ftr, fte = (features(trunk, root, names, images, side, cuts=cuts) for names in (train, test))
            seconds = time.perf_counter() - t0
            kinds = [("avg", "final map, average"), ("mask", "final map, under the mask")]
            if side == args.sizes[0]:
                kinds.append(("pixels", "pixels: RGB under the mask + area"))
            for cut in cuts:
                kinds += [(f"avg@{cut}", f"last {cut} blocks' input, average"),
                          (f"mask@{cut}", f"last {cut} blocks' input, under the mask")]
            for kind, name in kinds:
                right = {a: probe(ftr[kind], labels["train"][a], fte[kind], len(vocab[a])) == labels["test"][a]
                         for a in ATTRS}
                everything = torch.stack(list(right.values())).all(0)
                grid = "-" if kind == "pixels" else "x".join(map(str, [_grid(trunk, side, kind)] * 2))
                rows.append((side if kind != "pixels" else "-", grid, name,
                             *(100 * right[a].float().mean().item() for a in ATTRS),
                             100 * everything.float().mean().item(), seconds if kind == "avg" else None))
    print(f"linear probes, {len(train)} train / {len(test)} test images, data {args.data or 'generated (seed 0)'}")
    print(f"| {'px':>4} | {'grid':>4} | {'features':<38} | {'shape':>5} | {'colour':>6} | {'size':>5} | "
          f"{'pattern':>7} | {'all four':>8} | {'encode s':>8} |")
    print(f"|{'-' * 6}|{'-' * 6}|{'-' * 40}|{'-' * 7}|{'-' * 8}|{'-' * 7}|{'-' * 9}|{'-' * 10}|{'-' * 10}|")
    for side, grid, name, s, c, z, p, all4, sec in rows:
        sec_s = f"{sec:8.1f}" if sec is not None else " " * 8
        print(f"| {side!s:>4} | {grid:>4} | {name:<38} | {s:5.1f} | {c:6.1f} | {z:5.1f} | {p:7.1f} | {all4:8.1f} | "
              f"{sec_s} |")


if __name__ == "__main__":
    main()
