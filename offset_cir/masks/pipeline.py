"""Write masks for many images: resumable, atomic, failures reported and skipped (docs/model.md#masks and #data).

A mask that already exists, opens and has its image's size is kept (unless ``overwrite``).  Each mask is written
to a temporary name in its folder and renamed into place, so an interrupted run never leaves a partial file.
Captions used are kept in a JSON file (image name relative to the root -> caption) that is saved as the run goes
and read back on the next run, so a repeated or resumed run prompts CLIPSeg with the same text.
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image

from offset_cir import io
from offset_cir.errors import UserInputError
from offset_cir.images import ImageReadError, read_header, read_image
from offset_cir.masks.layout import MaskLayout, relative_name
from offset_cir.masks.records import MaskReport, read_captions, write_json_atomic  # noqa: F401  (public here too)
from offset_cir.masks.shards import Shard, shard_captions_file

logger = logging.getLogger(__name__)

CAPTIONS_FILE = "segmask-captions.json"


@dataclass(frozen=True)
class MaskJob:
    image: Path
    mask: Path
    key: str  # image path relative to the root, POSIX (the captions file key)
    category: str = ""


def plan(images: Sequence[Path], root: str | os.PathLike, layout: MaskLayout,
         out: str | os.PathLike | None = None) -> list[MaskJob]:
    """One job per image; refuses two images that would share a mask file."""
    root = Path(root)
    jobs, seen = [], {}
    for image in images:
        image = Path(image)
        mask = layout.mask_path(image, root, out)
        if mask in seen:
            raise UserInputError(f"{image} and {seen[mask]} would both write {mask}; use --mask-pattern with "
                                 "{rel_parent} or {name} to tell them apart")
        if mask == image:
            raise UserInputError(f"--mask-pattern {layout.pattern!r} maps {image} onto itself")
        seen[mask] = image
        jobs.append(MaskJob(image, mask, relative_name(image, root), layout.category(image, root)))
    return jobs


def lookup_caption(captions: dict[str, str], job: MaskJob) -> str | None:
    for key in (job.key, job.image.name, job.image.stem):
        if key in captions:
            return captions[key]
    return None


# ------------------------------------------------------------------------------------------- files
def mask_is_valid(mask: Path, size: tuple[int, int]) -> bool:
    """The mask file opens, decodes, is single-channel and has ``size`` (width, height)."""
    try:
        header = read_header(mask, what="mask")
        if header.size != tuple(size) or header.mode not in ("L", "1", "P", "I", "I;16"):
            return False
        read_image(mask, None, what="mask")
        return True
    except ImageReadError:
        return False


def save_mask_atomic(mask_image: Image.Image, path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: never a partial mask under the real name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    # PNG level 3: much faster than zlib's default 6, files slightly larger
    options = {"quality": 95} if fmt == "JPEG" else {"compress_level": 3}
    with io.atomic_open(path, "wb") as fh:
        mask_image.save(fh, format=fmt, **options)


def remove_stale_temporaries(paths: Sequence[Path]) -> int:
    """Delete the temporary files a killed run left beside ``paths`` (``.<name>.tmp<pid>``, see offset_cir.io);
    nothing else is touched. Returns how many were removed."""
    names: dict[Path, set[str]] = {}
    for path in paths:
        names.setdefault(path.parent, set()).add(path.name)
    removed = 0
    for folder, wanted in names.items():
        try:
            entries = list(os.scandir(folder))
        except OSError:  # not there yet
            continue
        for entry in entries:
            if io.is_temporary(entry.name) and entry.name[1:].rpartition(".tmp")[0] in wanted:
                Path(entry.path).unlink(missing_ok=True)
                removed += 1
    return removed


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if not text.startswith(type(exc).__name__) else text


# ------------------------------------------------------------------------------------------- the run
def batches_of(jobs: Sequence[MaskJob], batch_size: int, shard: Shard | None = None) -> list[list[MaskJob]]:
    """The batches a run makes: consecutive blocks of ``batch_size`` jobs of the plan, those of ``shard`` (block
    ``b`` belongs to shard ``b % count``). Each batch is the same whichever shard runs it, so N processes compute
    what one would, batch for batch."""
    shard = shard or Shard()
    size = max(1, int(batch_size))
    return [list(jobs[s:s + size]) for b, s in enumerate(range(0, len(jobs), size)) if b % shard.count == shard.index]


def _known_captions(out_path: Path | None, overwrite: bool, captions: dict[str, str] | None,
                    also: Sequence[Path] = ()) -> tuple[dict[str, str], dict[str, str]]:
    """(captions used so far: from ``out_path`` and ``also``, captions to reuse: those, unless ``overwrite``, under
    the caller's ``captions``)."""
    used: dict[str, str] = {}
    for path in ([out_path] if out_path is not None else []) + list(also):
        if path.exists():
            try:
                used.update(read_captions(path))
            except UserInputError as exc:
                logger.warning("ignoring unreadable captions file %s (%s); it will be rewritten", path, exc)
    given = {} if overwrite else dict(used)  # --overwrite redoes captions too, unless given by the user
    given.update(captions or {})
    return used, given


def _check_jobs(pool, jobs: Sequence[MaskJob], overwrite: bool, report: MaskReport) -> set[MaskJob]:
    """The jobs whose mask is missing or invalid; images that do not open are recorded as failures."""
    def check(job: MaskJob):
        try:
            size = read_header(job.image).size
        except ImageReadError as exc:
            return job, "failed", str(exc)
        if not overwrite and job.mask.exists() and mask_is_valid(job.mask, size):
            return job, "skip", None
        return job, "todo", None

    todo = set()
    for job, state, reason in pool.map(check, jobs):
        if state == "failed":
            report.failed.append((str(job.image), reason))
        elif state == "skip":
            report.skipped += 1
        else:
            todo.add(job)
    if report.skipped:
        logger.info("%d of %d masks already exist and are valid: skipped", report.skipped, len(jobs))
    return todo


def run_masks(jobs: Sequence[MaskJob], generator, captions_out: str | os.PathLike | None = None,
              captions: dict[str, str] | None = None, overwrite: bool = False, workers: int = 4,
              progress: bool = True, save_every_s: float = 30.0, shard: Shard | None = None) -> MaskReport:
    """Make the masks of ``jobs`` with ``generator`` (a :class:`~offset_cir.masks.MaskGenerator`).

    ``captions`` (e.g. from ``--captions FILE``) take precedence over those already in ``captions_out``; images
    without one are captioned (the captioner is built only then).  Failures (unreadable image, unwritable mask)
    are recorded with a reason and the run goes on. ``shard``: this process's part of the plan ``jobs``
    (:func:`batches_of`); it keeps its captions in its own file beside ``captions_out``
    (:func:`offset_cir.masks.shards.shard_captions_file`), merged by :func:`offset_cir.masks.shards.merge`.
    """
    shard = shard or Shard()
    t0 = time.perf_counter()
    batches = batches_of(jobs, generator.batch_size, shard)
    mine = [job for batch in batches for job in batch]
    report = MaskReport(total=len(mine))
    out_path = Path(captions_out) if captions_out is not None else None
    save_path = out_path
    if out_path is not None and shard.count > 1:
        save_path = shard_captions_file(out_path, shard)
    used, given = _known_captions(out_path, overwrite, captions, [save_path] if save_path != out_path else [])
    stale = remove_stale_temporaries([job.mask for job in mine] + ([save_path] if save_path is not None else []))
    if stale:
        logger.info("removed %d temporary files left by an interrupted run", stale)
    pool = ThreadPoolExecutor(max(1, int(workers)))
    pending: list = []  # (job, caption, future of the file write)
    try:
        todo = _check_jobs(pool, mine, overwrite, report)
        batches = [b for b in ([j for j in batch if j in todo] for batch in batches) if b]
        if batches:
            _generate(batches, generator, given, used, pool, pending, report, save_path, save_every_s, progress)
    finally:
        try:
            _drain(pending, report, used)  # masks already computed are still written, even when interrupted
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if save_path is not None and used:
            write_json_atomic(save_path, used)
            report.captions_file = str(save_path)
        report.seconds = time.perf_counter() - t0
    return report


def _generate(batches: list[list[MaskJob]], generator, given: dict, used: dict, pool, pending: list,
              report: MaskReport, save_path: Path | None, save_every_s: float, progress: bool) -> None:
    """Caption (where needed), segment and write ``batches``, decoding the next batch while one runs."""
    from tqdm import tqdm

    # build the back-ends before the loop, so a missing model fails now, not after the first batch
    known = {job.key: lookup_caption(given, job) for batch in batches for job in batch}
    needs_captioner = generator.needs_captions and any(c is None for c in known.values())
    generator.load(captioner=needs_captioner)
    if generator.needs_captions and not needs_captioner:
        logger.info("every caption is given: no captioner is built")
    last_save = time.monotonic()
    bar = tqdm(total=len(known), unit="img", desc="masks", disable=not progress)
    next_batch = pool.map(_try_load, batches[0])
    for n, batch in enumerate(batches):
        loaded = list(next_batch)
        if n + 1 < len(batches):  # decode the next batch while this one runs
            next_batch = pool.map(_try_load, batches[n + 1])
        good = []
        for job, (image, reason) in zip(batch, loaded):
            if image is None:
                report.failed.append((str(job.image), reason))
                logger.warning("skipping %s: %s", job.image, reason)
            else:
                good.append((job, image))
        if good:
            caps = [known[j.key] for j, _ in good]
            missing = [i for i, c in enumerate(caps) if c is None] if generator.needs_captions else []
            if missing:  # caption first and keep the captions, so a resumed run reuses them
                for i, text in zip(missing, generator.caption([good[i][1] for i in missing])):
                    caps[i] = known[good[i][0].key] = used[good[i][0].key] = text
            masks, _ = generator.generate(
                [im for _, im in good], caps,
                categories=[j.category for j, _ in good], stems=[j.image.stem for j, _ in good])
            _drain(pending, report, used)  # the previous batch's files, encoded while this batch ran
            for (job, image), mask, cap in zip(good, masks, caps):
                if mask.size != image.size:
                    raise RuntimeError(f"mask size {mask.size} != image size {image.size} for {job.image}")
                pending.append((job, cap, pool.submit(save_mask_atomic, mask, job.mask)))
        bar.update(len(batch))
        if save_path is not None and time.monotonic() - last_save > save_every_s:
            write_json_atomic(save_path, used)
            last_save = time.monotonic()
    _drain(pending, report, used)
    bar.close()


def _drain(pending: list, report: MaskReport, used: dict) -> None:
    """Wait for submitted mask writes; count them, record their captions or their failures."""
    while pending:
        job, cap, future = pending.pop(0)
        try:
            future.result()
        except OSError as exc:
            report.failed.append((str(job.mask), _reason(exc)))
            continue
        report.written += 1
        if cap is not None:
            used[job.key] = cap


def _try_load(job: MaskJob):
    try:
        return read_image(job.image, "RGB"), None
    except ImageReadError as exc:
        return None, str(exc)
