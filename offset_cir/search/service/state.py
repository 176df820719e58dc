"""What one service app holds: its limits, the opened index, its metrics and search slots, the page, and the public
names of the server's folders (``request.app.state.service``)."""
from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path

from offset_cir.search.index import Index
from offset_cir.search.service.guards import SearchSlots, public_message
from offset_cir.search.service.metrics import Metrics

MAX_UPLOAD_BYTES = 10 << 20
MAX_PIXELS = 40_000_000
MAX_K = 100
MAX_TEXT_CHARS = 500
MAX_CONCURRENCY = 8
#: queries encoded together at most, and seconds the encoder waits for queries on their way
MAX_BATCH = 8
BATCH_WAIT = 0.005
QUEUE_TIMEOUT = 30.0
#: seconds for a request body to arrive in full (10 MiB in 30 s is 350 KB/s)
BODY_TIMEOUT = 30.0


@dataclasses.dataclass(frozen=True)
class ServiceLimits:
    """The limits one app enforces (``offset serve``'s flags)."""

    #: largest request body in bytes (413 beyond, refused while it streams in)
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    #: largest uploaded image in pixels (413 beyond, read from the header before decoding)
    max_pixels: int = MAX_PIXELS
    #: searches running at once (decoding, encoding, ranking); the others wait for a slot
    max_concurrency: int = MAX_CONCURRENCY
    #: queries encoded together in one model call at most (1: each alone)
    max_batch: int = MAX_BATCH
    #: seconds the encoder waits for queries on their way before it encodes the ones it has
    batch_wait: float = BATCH_WAIT
    #: most results one search may ask for
    max_k: int = MAX_K
    #: longest modification text in characters
    max_text_chars: int = MAX_TEXT_CHARS
    #: seconds a search may wait for a slot before it gets 503
    queue_timeout: float = QUEUE_TIMEOUT
    #: seconds for a request body to arrive in full (408 beyond); None: no deadline
    body_timeout: float | None = BODY_TIMEOUT

    def to_json(self) -> dict:
        """The ``limits`` of ``GET /health``."""
        return {"max_upload_bytes": self.max_upload_bytes, "max_pixels": self.max_pixels, "max_k": self.max_k,
                "max_text_chars": self.max_text_chars,
                "max_concurrency": max(1, int(self.max_concurrency)), "queue_timeout_s": self.queue_timeout,
                "body_timeout_s": self.body_timeout, "max_batch": max(1, int(self.max_batch)),
                "batch_wait_ms": self.batch_wait * 1000.0}


def page_html() -> str:
    """The web page served at ``/`` (package data ``search/static/index.html``)."""
    return resources.files("offset_cir.search").joinpath("static/index.html").read_text(encoding="utf-8")


def known_folders(index: Index) -> list[tuple[str, str]]:
    """Server folders that library messages may name, with the public name a client sees instead."""
    images_root = index.manifest.get("images_root", "")
    known = [(str(Path(images_root).resolve()), "<gallery>"), (str(Path(images_root)), "<gallery>"),
             (str(Path(index.path).resolve()), "<index>"), (str(index.path), "<index>")]
    return [(f, n) for f, n in known if f not in ("", ".")]


@dataclasses.dataclass
class Service:
    """The state the routes share: ``index`` is never written to."""

    index: Index
    limits: ServiceLimits
    metrics: Metrics
    slots: SearchSlots
    page: str
    folders: list[tuple[str, str]]

    @classmethod
    def create(cls, index: Index, limits: ServiceLimits, registry=None) -> "Service":
        metrics = Metrics(index, registry)
        # concurrent searches share the model: one call for the queries that reach it together
        index.batch_queries(limits.max_batch, limits.batch_wait, on_batch=metrics.batch_size.observe)
        return cls(index, limits, metrics, SearchSlots(limits.max_concurrency, limits.queue_timeout, metrics),
                   page_html(), known_folders(index))

    def public(self, message: str) -> str:
        """``message`` as a client may see it: server folders named by their public names, other paths hidden."""
        return public_message(message, self.folders)


def service_of(request) -> Service:
    """The :class:`Service` of the app answering ``request``."""
    return request.app.state.service
