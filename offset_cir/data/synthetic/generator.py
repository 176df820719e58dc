"""Writing a benchmark folder: check the settings, reuse, refuse or clear the folder, plan, render, write the files.

Files (``root`` = output folder)::

    image_splits/split.rc2.<split>.json   name -> "./<split>/<name>.png"
    captions/cap.rc2.<split>.json         CIRR records (pairid, reference, target_hard, target_soft, caption, img_set)
    <split>/<name>.png, <split>/<name>-segmask.png
    synthetic_meta.json                   written last: a folder without it is an interrupted run

Images are rendered in worker processes (each image's pixels depend on its own seed words only), so the files
are byte-identical for the same settings whatever the number of workers.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from offset_cir.data.synthetic.meta import META_NAME, PARTIAL_MARKER, read_meta
from offset_cir.data.synthetic.plan import SPLITS, choose_heldout, plan_benchmark
from offset_cir.data.synthetic.render import degrade_mask, render_image
from offset_cir.data.synthetic.vocab import VOCAB
from offset_cir.errors import DatasetError, UserInputError
from offset_cir.io import write_json

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "1"
DEFAULTS = {
    "seed": 0,
    "image_size": 64,
    "n_train": 3000,
    "n_val": 300,
    "n_test": 500,
    "mask_noise": 0.0,
    "unseen_fraction": 0.25,
    "train_queries_per_set": 3,
}


def _render_chunk(task: tuple) -> list[dict]:
    """Worker: render and write a list of images; returns their geometry (deterministic per image seed)."""
    from PIL import Image

    root, image_size, mask_noise, items = task
    out = []
    for rel, attrs, seed_words in items:
        rgb, mask, geo = render_image(attrs, image_size, list(seed_words) + [0])
        if mask_noise > 0:
            mask = degrade_mask(mask, mask_noise, geo["radius"], list(seed_words) + [1])
        path = Path(root) / rel
        Image.fromarray(rgb, mode="RGB").save(path, format="PNG", compress_level=1)
        m8 = np.clip(np.rint(mask * 255.0), 0, 255).astype(np.uint8)
        Image.fromarray(m8, mode="L").save(path.with_name(path.stem + "-segmask.png"), format="PNG",
                                           compress_level=1)
        out.append(geo)
    return out


def _config(seed, image_size, n_train, n_val, n_test, mask_noise, unseen_fraction, train_queries_per_set) -> dict:
    return {"generator_version": GENERATOR_VERSION, "seed": int(seed), "image_size": int(image_size),
            "n_queries": {"train": int(n_train), "val": int(n_val), "test": int(n_test)},
            "mask_noise": float(mask_noise), "unseen_fraction": float(unseen_fraction),
            "train_queries_per_set": int(train_queries_per_set)}


def _validate(seed, image_size, n_train, n_val, n_test, mask_noise, unseen_fraction, train_queries_per_set):
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserInputError(f"seed: expected a non-negative integer, got {seed!r}")
    if not isinstance(image_size, (int, np.integer)) or not 32 <= image_size <= 1024:
        raise UserInputError(f"image_size: expected an integer from 32 to 1024 pixels, got {image_size!r}")
    for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise UserInputError(f"{name}: expected a positive number of queries, got {n!r}")
    if not 0.0 <= float(mask_noise) <= 1.0:
        raise UserInputError(f"mask_noise: expected a value in [0, 1], got {mask_noise!r}")
    if not 0.0 <= float(unseen_fraction) <= 1.0:
        raise UserInputError(f"unseen_fraction: expected a value in [0, 1], got {unseen_fraction!r}")
    if train_queries_per_set not in (1, 2, 3):
        raise UserInputError(f"train_queries_per_set: expected 1, 2 or 3, got {train_queries_per_set!r}")


_OWNED = ("image_splits", "captions", *SPLITS, META_NAME, PARTIAL_MARKER)


def _summary(meta: dict, root: Path, reused: bool, seconds: float) -> dict:
    return {"root": str(root), "generator_version": meta["generator_version"], "seed": meta["seed"],
            "image_size": meta["image_size"], "mask_noise": meta["mask_noise"], "splits": meta["counts"],
            "heldout_pairs": meta["heldout_pairs"], "reused": reused, "seconds": round(seconds, 2)}


def _prepare_folder(root: Path, config: dict, overwrite: bool) -> dict | None:
    """Decide what to do with ``root``: the existing meta when it is an up-to-date benchmark (reuse it),
    else None after clearing the generator's own paths. Refuses foreign or differently made folders."""
    meta_path = root / META_NAME
    if root.exists() and not root.is_dir():
        raise UserInputError(f"{root}: expected a folder for the synthetic benchmark, found a file")
    if meta_path.exists():
        try:
            old = read_meta(meta_path)
            same = old.get("config") == config
        except (OSError, DatasetError):  # unreadable or not this generator's: not the same settings
            old, same = None, False
        complete = same and all((root / "captions" / f"cap.rc2.{s}.json").is_file()
                                and (root / "image_splits" / f"split.rc2.{s}.json").is_file() for s in SPLITS)
        if complete and not overwrite:
            return old
        if not same and not overwrite:
            raise UserInputError(
                f"{root}: holds a synthetic benchmark made with other settings ({meta_path}); "
                "pass overwrite (--overwrite) to replace it or choose another folder")
    elif (root / PARTIAL_MARKER).exists():
        logger.warning("%s: an interrupted generation was found (no %s); generating again", root, META_NAME)
    elif root.exists() and any(root.iterdir()) and not overwrite:
        raise UserInputError(
            f"{root}: folder is not empty and holds no synthetic benchmark; pass overwrite (--overwrite) "
            "or choose an empty folder")
    for name in _OWNED:  # only what this generator writes; other files stay
        p = root / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    return None


def _render_all(root: Path, items: list, image_size: int, mask_noise: float, workers: int | None,
                progress: bool) -> list[dict]:
    """Render and write every image and mask (in ``workers`` spawned processes); geometry in item order."""
    from tqdm import tqdm

    chunk = 64
    tasks = [(str(root), image_size, float(mask_noise), items[i:i + chunk]) for i in range(0, len(items), chunk)]
    if workers is None:
        workers = min(2, os.cpu_count() or 1) if len(items) >= 1000 else 1
    geos: list[dict] = []
    with tqdm(total=len(items), desc="synth images", unit="img", disable=not progress) as bar:
        if workers > 1:
            import multiprocessing as mp

            # fork where there is one: a spawned worker would re-import offset_cir.data and with it torch
            # (seconds and ~0.7 GB each); the workers use only numpy and PIL. Results are seed-determined.
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            with mp.get_context(method).Pool(workers) as pool:
                for res in pool.imap(_render_chunk, tasks):
                    geos.extend(res)
                    bar.update(len(res))
        else:
            for t in tasks:
                res = _render_chunk(t)
                geos.extend(res)
                bar.update(len(res))
    return geos


def generate(out_dir, seed: int = 0, image_size: int = 64, n_train: int = DEFAULTS["n_train"],
             n_val: int = DEFAULTS["n_val"], n_test: int = DEFAULTS["n_test"], mask_noise: float = 0.0,
             unseen_fraction: float = DEFAULTS["unseen_fraction"],
             train_queries_per_set: int = DEFAULTS["train_queries_per_set"], overwrite: bool = False,
             workers: int | None = None, progress: bool = True) -> dict:
    """Write the synthetic benchmark to ``out_dir`` in the CIRR layout (docs/model.md#data) and return a summary
    (``root``, ``seed``, ``image_size``, ``mask_noise``, per-split counts under ``splits``, ``heldout_pairs``,
    ``reused``, ``seconds``).

    ``n_train``/``n_val``/``n_test`` count queries (triplets). An existing benchmark with the same settings is
    reused as is; one with other settings, or a folder with other files, is refused unless ``overwrite``
    (which deletes only the paths this generator writes). A folder left by an interrupted run (no
    ``synthetic_meta.json``) is regenerated. ``workers`` processes render images (default: up to 2).
    """
    _validate(seed, image_size, n_train, n_val, n_test, mask_noise, unseen_fraction, train_queries_per_set)
    t0 = time.perf_counter()
    root = Path(out_dir)
    config = _config(seed, image_size, n_train, n_val, n_test, mask_noise, unseen_fraction, train_queries_per_set)
    old = _prepare_folder(root, config, overwrite)
    if old is not None:
        logger.info("synthetic benchmark in %s is up to date; reusing it", root)
        return _summary(old, root, True, time.perf_counter() - t0)
    root.mkdir(parents=True, exist_ok=True)
    (root / PARTIAL_MARKER).write_text("generation in progress; synthetic_meta.json is written last\n")

    heldout = choose_heldout(seed)
    plan = plan_benchmark(seed, {"train": n_train, "val": n_val, "test": n_test}, unseen_fraction,
                          train_queries_per_set, set(heldout))
    for split in SPLITS:
        (root / split).mkdir(parents=True, exist_ok=True)
    geos = _render_all(root, plan["render"], image_size, mask_noise, workers, progress)
    images = plan["images"]
    for (rel, _, _), geo in zip(plan["render"], geos):
        images[Path(rel).stem].update(geo)

    (root / "image_splits").mkdir(exist_ok=True)
    (root / "captions").mkdir(exist_ok=True)
    split_counts = {}
    for split in SPLITS:
        names = [n for n, v in images.items() if v["split"] == split]
        records = plan["records"][split]
        write_json(root / "image_splits" / f"split.rc2.{split}.json", {n: f"./{split}/{n}.png" for n in names},
                   indent=1)
        write_json(root / "captions" / f"cap.rc2.{split}.json", records, indent=1)
        split_counts[split] = {"queries": len(records), "images": len(names),
                               "sets": len({r["img_set"]["id"] for r in records}),
                               "unseen_queries": len(plan["unseen"][split])}
    meta = {
        **config, "config": config, "counts": split_counts, "vocab": VOCAB,
        "heldout_pairs": [list(p) for p in heldout], "unseen_pairids": plan["unseen"],
        "queries": plan["queries"], "images": images,
    }
    write_json(root / META_NAME, meta, indent=None)  # last: its presence marks a complete benchmark
    (root / PARTIAL_MARKER).unlink()
    seconds = time.perf_counter() - t0
    logger.info("synthetic benchmark written to %s in %.1f s", root, seconds)
    return _summary(meta, root, False, seconds)
