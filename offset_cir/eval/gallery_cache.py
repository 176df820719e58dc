"""Gallery features kept on disk, so that a large gallery (CIRCO's 123,403 images) is encoded once per model.

The evaluation encodes a gallery with ``model.encode_target``; those features are a function of the model's
weights and of the image (and mask) files alone, so they are stored per model and reused:

- the same model evaluated again (another protocol, split or variant, the test-server file after the val
  scores) reads the stored features and encodes nothing;
- an interrupted encoding resumes: the gallery is stored in chunks of ``chunk_size`` images, each written whole
  as soon as it is encoded;
- another model encodes its own (features depend on the weights: nothing of one model's can serve another).

A model is named by ``model_key``, a string its caller vouches for: a checkpoint's content hash
(``offset eval`` uses :func:`offset_cir.model.checkpoint.checkpoint_hash`), or a baseline's identity
(:attr:`offset_cir.model.baseline.BaselineEncoder.target_identity`). A chunk's file is named by the SHA-256 of
the model key, ``setting`` (what else shapes the features: preprocessing, masks) and, for each of its images,
its id and the name, size and modification time of its image and mask files: a changed file makes a new chunk.

Files: ``<root>/<sha256 of model_key>[:16]/<chunk key>.safetensors`` (float32 ``features`` [n, D] and the ids in
the metadata), renamed into place whole; a file that does not load or does not hold its ids is encoded again.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from offset_cir import io
from offset_cir.hashing import bytes_sha256

log = logging.getLogger(__name__)

CHUNK_SIZE = 4096
FORMAT = "offset-cir-gallery-features-1"


def _file_stamp(path) -> list:
    """Name, size and modification time of a file (None when it does not exist)."""
    try:
        st = os.stat(path)
    except OSError:
        return [Path(path).name, None, None]
    return [Path(path).name, st.st_size, st.st_mtime_ns]


@dataclass
class CacheUse:
    """What one call found: chunks read from disk and chunks encoded."""

    reused: int = 0
    encoded: int = 0
    images_encoded: int = 0
    folders: list[str] = field(default_factory=list)


class GalleryCache:
    """Gallery features of the model ``model_key`` under ``root`` (see the module doc)."""

    def __init__(self, root: str | os.PathLike, model_key: str, chunk_size: int = CHUNK_SIZE):
        if not model_key:
            raise ValueError("GalleryCache needs a model_key naming the model's weights")
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.root, self.model_key, self.chunk_size = Path(root), str(model_key), int(chunk_size)
        self.folder = self.root / bytes_sha256(self.model_key.encode("utf-8"))[:16]
        self.last = CacheUse()

    def chunk_key(self, ids: list[str], files: Callable[[str], Iterable], setting: dict) -> str:
        items = [[i, [_file_stamp(p) for p in files(i)]] for i in ids]
        blob = json.dumps({"format": FORMAT, "model": self.model_key, "setting": setting, "items": items},
                          sort_keys=True, separators=(",", ":"), default=str)
        return bytes_sha256(blob.encode("utf-8"))

    def _read(self, path: Path, ids: list[str]) -> torch.Tensor | None:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                if json.loads((f.metadata() or {}).get("ids", "null")) != ids:
                    return None
                return f.get_tensor("features")
        except Exception:  # noqa: BLE001  a torn or foreign file is encoded again
            return None

    def _write(self, path: Path, ids: list[str], feats: torch.Tensor) -> None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        with io.atomic_path(path, durable=False) as tmp:
            save_file({"features": feats.detach().float().cpu().contiguous()}, str(tmp),
                      metadata={"ids": json.dumps(ids), "model": self.model_key, "format": FORMAT})

    def features(self, ids: list[str], files: Callable[[str], Iterable], setting: dict,
                 encode: Callable[[list[str]], Iterator[torch.Tensor]]) -> torch.Tensor:
        """Features [len(ids), D] of ``ids`` in order: stored chunks are read, the others encoded with
        ``encode(missing ids)`` (an iterator of feature batches, in order) and stored chunk by chunk.
        ``files(id)`` lists the files an id's feature is made from (its image, and its mask when used)."""
        ids = list(ids)
        chunks = [ids[s:s + self.chunk_size] for s in range(0, len(ids), self.chunk_size)]
        paths = [self.folder / f"{self.chunk_key(c, files, setting)}.safetensors" for c in chunks]
        found: list[torch.Tensor | None] = [self._read(p, c) if p.is_file() else None for p, c in zip(paths, chunks)]
        todo = [j for j, f in enumerate(found) if f is None]
        self.last = CacheUse(reused=len(chunks) - len(todo), encoded=len(todo),
                             images_encoded=sum(len(chunks[j]) for j in todo), folders=[str(self.folder)])
        if todo:
            log.info("gallery features: %d of %d chunks stored in %s; encoding %d images", len(chunks) - len(todo),
                     len(chunks), self.folder, self.last.images_encoded)
            for j, feats in zip(todo, _rechunk(encode([i for j in todo for i in chunks[j]]),
                                               [len(chunks[j]) for j in todo])):
                self._write(paths[j], chunks[j], feats)
                found[j] = feats.detach().float().cpu()
        if not found:
            return torch.empty(0)
        return torch.cat(found)  # type: ignore[arg-type]


def _rechunk(batches: Iterator[torch.Tensor], sizes: list[int]) -> Iterator[torch.Tensor]:
    """Regroup a stream of feature batches into consecutive blocks of ``sizes`` rows, each yielded when full."""
    buffer: list[torch.Tensor] = []
    held = 0
    wanted = iter(sizes)
    need = next(wanted, None)
    for batch in batches:
        buffer.append(batch.detach().float().cpu())
        held += batch.shape[0]
        while need is not None and held >= need:
            block = torch.cat(buffer)
            yield block[:need]
            rest = block[need:]
            buffer, held = ([rest] if rest.shape[0] else []), rest.shape[0]
            need = next(wanted, None)
    if need is not None:
        raise RuntimeError(f"the gallery encoder stopped {need - held} images short of a chunk")
