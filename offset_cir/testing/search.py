"""A second stand-in for OFFSET for the search tests and benchmarks (``PixelModel``: a linear projection of pixels),
generated image galleries, and the tiny OFFSET trained a few steps on the synthetic benchmark.

``PixelModel`` implements the model contract the index relies on (docs/architecture.md, "Model contract"):
encode_query / encode_target (L2-normalised), uses_masks, preprocess.image / .mask / .pair, config (with
``to_dict``), embed_dim. It is not OFFSET; the end-to-end search tests use the real tiny model.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SIZE = 16


@dataclasses.dataclass
class PixelConfig:
    """The config of a :class:`PixelModel`."""

    #: the name a model config carries
    backbone: str = "fake"
    #: feature width
    dim: int = 16
    #: whether images are weighted by their masks
    use_masks: bool = True
    #: seed of the random projection and word vectors
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class PixelPreprocess:
    """Resize to 16x16 and scale to [0, 1]; masks as three equal channels."""

    image_size = SIZE

    def image(self, pil, train=False):
        pil = pil.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
        return torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()

    def mask(self, pil, train=False):
        pil = pil.convert("L").resize((SIZE, SIZE), Image.BILINEAR)
        return torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0)[None].repeat(3, 1, 1).contiguous()

    def pair(self, pil, mask_pil, train=False):
        return self.image(pil, train), (self.mask(mask_pil, train) if mask_pil is not None else None)


class PixelModel(torch.nn.Module):
    """Linear projection of (mask-weighted) pixels; the text adds a bag-of-words vector."""

    def __init__(self, dim=16, uses_masks=True, seed=0, delay=0.0, fail_after=None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = torch.nn.Linear(3 * SIZE * SIZE, dim, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(dim, 3 * SIZE * SIZE, generator=g))
        self.register_buffer("words", torch.randn(97, dim, generator=g))
        self.uses_masks = uses_masks
        self.embed_dim = dim
        self.preprocess = PixelPreprocess()
        self.config = PixelConfig(dim=dim, use_masks=uses_masks, seed=seed)
        self.encoded = 0  # images passed to encode_target
        self.delay = delay
        self.fail_after = fail_after  # raise after this many encode_target batches

    def _visual(self, images, masks):
        x = images
        if self.uses_masks:
            assert masks is not None and masks.shape == images.shape
            x = x * (0.25 + 0.75 * masks)
        return self.proj(x.flatten(1))

    def encode_target(self, images, masks=None):
        if self.fail_after is not None:
            if self.fail_after <= 0:
                raise RuntimeError("simulated crash")
            self.fail_after -= 1
        if self.delay:
            time.sleep(self.delay)
        self.encoded += images.shape[0]
        return F.normalize(self._visual(images, masks), dim=-1)

    def text_vec(self, texts):
        rows = []
        for t in texts:
            v = torch.zeros(self.words.shape[1])
            for w in t.lower().split():
                v = v + self.words[zlib.crc32(w.encode()) % self.words.shape[0]]
            rows.append(v)
        return torch.stack(rows)

    def encode_query(self, images, masks, texts):
        v = F.normalize(self._visual(images, masks), dim=-1)
        return F.normalize(v + 0.7 * F.normalize(self.text_vec(texts), dim=-1), dim=-1)


def make_gallery(root: Path, n: int = 30, seed: int = 0, masks: bool = True, size: int = 24, sub_every: int = 4):
    """``n`` random block images (every ``sub_every``-th in sub/), each with ``<stem>-segmask.png`` beside it."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        folder = root / "sub" if sub_every and i % sub_every == 0 else root
        folder.mkdir(exist_ok=True)
        blocks = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        img = Image.fromarray(np.kron(blocks, np.ones((size // 4, size // 4, 1), dtype=np.uint8)))
        p = folder / f"img{i:03d}.png"
        img.save(p)
        if masks:
            m = np.zeros((size, size), dtype=np.uint8)
            y0, x0 = rng.integers(0, size // 2, size=2)
            m[y0:y0 + size // 2, x0:x0 + size // 2] = 255
            Image.fromarray(m, "L").save(folder / f"img{i:03d}-segmask.png")
        paths.append(p)
    return paths


def index_gallery(base: Path, n: int = 16, model=None, **gallery):
    """A gallery of ``n`` images under ``base/g`` (:func:`make_gallery`) indexed into ``base/idx`` with ``model``
    (a new :class:`PixelModel` by default), in this process, on the CPU; returns the model."""
    from offset_cir.search import build_index

    model = model if model is not None else PixelModel()
    make_gallery(base / "g", n=n, **gallery)
    build_index(base / "idx", base / "g", model=model, progress=False, device="cpu", distributed=False)
    return model


def copy_items(paths, src_root: Path, dst_root: Path):
    """Copy images (and their masks) keeping sub-folders and modification times."""
    for p in paths:
        rel = p.relative_to(src_root)
        (dst_root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, dst_root / rel)
        m = p.with_name(p.stem + "-segmask.png")
        if m.exists():
            shutil.copy2(m, dst_root / rel.parent / m.name)


def reference_features(model, paths, masks=True):
    """Gallery features computed directly with the model, one image at a time (independent of the index)."""
    out = []
    with torch.inference_mode():
        for p in paths:
            img = model.preprocess.image(Image.open(p))[None]
            m = model.preprocess.mask(Image.open(p.with_name(p.stem + "-segmask.png")))[None] if masks else None
            out.append(model.encode_target(img, m)[0].numpy())
    return np.stack(out)


def kill_after_shards(script: Path, out: Path, min_shards: int = 2, timeout: float = 50.0) -> int:
    """Run an indexing ``script`` in a subprocess, SIGKILL it once ``min_shards`` shards exist under ``out``;
    returns the number of finished shards it left behind (bounded wait of ``timeout`` seconds)."""
    import os
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, str(script)], env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None:
            if len(list((out / "shards").glob("shard-*.json"))) >= min_shards:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return len(list((out / "shards").glob("shard-*.json")))


def synthetic_image_pair(root: Path, split: str, name: str, pre, train: bool):
    """(image tensor, mask tensor) of image ``name`` of a generated synthetic benchmark, through ``pre``."""
    import json

    rel = json.loads((root / "image_splits" / f"split.rc2.{split}.json").read_text())[name]
    p = (root / rel).resolve()
    return pre.image(Image.open(p), train=train), pre.mask(Image.open(p.with_name(p.stem + "-segmask.png")), train=train)


def train_tiny_on_synthetic(base: Path, steps: int = 3, *, n_train: int = 16, n_test: int = 8,
                            new_lr: float | None = None):
    """A synthetic benchmark under ``base/synth`` (``n_test`` test queries, 6 test images each) and the real tiny
    OFFSET trained ``steps`` AdamW steps of 8 triplets on it (lr 1e-4; with ``new_lr``, the model's parameter
    groups: backbone 1e-4, new modules ``new_lr``), saved to ``base/ckpt``: (root, checkpoint, losses)."""
    import json

    import offset_cir
    from offset_cir.data import synthetic

    root = base / "synth"
    synthetic.generate(root, seed=0, image_size=64, n_train=n_train, n_val=4, n_test=n_test, progress=False,
                       workers=1)
    torch.manual_seed(0)
    model = offset_cir.build_model(offset_cir.ModelConfig(backbone="tiny"))
    model.train()
    params = model.parameters() if new_lr is None else model.parameter_groups(1e-4, new_lr)
    opt = torch.optim.AdamW(params, lr=1e-4)
    recs = json.loads((root / "captions" / "cap.rc2.train.json").read_text())
    losses = []
    for step in range(steps):
        batch = [recs[(step * 8 + i) % len(recs)] for i in range(8)]
        ref = [synthetic_image_pair(root, "train", r["reference"], model.preprocess, True) for r in batch]
        tgt = [synthetic_image_pair(root, "train", r["target_hard"], model.preprocess, True) for r in batch]
        out = model.compute_loss(torch.stack([a for a, _ in ref]), torch.stack([b for _, b in ref]),
                                 [r["caption"] for r in batch], torch.stack([a for a, _ in tgt]),
                                 torch.stack([b for _, b in tgt]))
        opt.zero_grad()
        out["total"].backward()
        opt.step()
        losses.append(float(out["total"].detach()))
    model.eval()
    return root, offset_cir.save_checkpoint(model, base / "ckpt"), losses
