"""The service's Prometheus metrics (``GET /metrics``), in a registry of their own per app."""
from __future__ import annotations


class Metrics:
    """The service's Prometheus metrics, in a registry of their own (several apps can live in one process)."""

    def __init__(self, index, registry=None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter("offset_http_requests", "HTTP requests answered, by route template, method and "
                                "status (499: the client went away)", ["route", "method", "status"], registry=r)
        self.seconds = Histogram(
            "offset_search_seconds", "search time by stage: queue (waiting for a slot), decode (uploaded images), "
            "encode (the composed query), search (ranking the gallery), total (the whole request)", ["stage"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=r)
        self.queue_depth = Gauge("offset_search_queue_depth", "searches waiting for a slot", registry=r)
        self.in_progress = Gauge("offset_search_in_progress", "searches running", registry=r)
        self.busy = Counter("offset_search_busy", "searches refused with 503 (no slot within the queue timeout)",
                            registry=r)
        self.batch_size = Histogram("offset_query_batch_size", "queries encoded together in one model call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        Gauge("offset_index_images", "images in the served index", registry=r).set(len(index))
        Info("offset_model", "the served model and index", registry=r).info({
            "checkpoint_hash": str(index.manifest["checkpoint"]["hash"]), "dim": str(index.manifest["dim"]),
            "search": str(index.manifest.get("search", {}).get("kind", "exact"))})

    def observe_stages(self, stages: dict[str, float]) -> None:
        """One observation of each stage's seconds."""
        for stage, seconds in stages.items():
            self.seconds.labels(stage).observe(seconds)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
