"""The service's application factory: ``create_app(index, ...)`` puts together the routes, the app's state and the
guards, in their order.

The OpenAPI document is served at ``/openapi.json`` (``document.openapi_document``); no documentation page is.

Middleware, outermost first: security headers (on every answer, refusals included), request accounting (metrics,
clients that go away, unexpected errors), the Host check, the body limit; then FastAPI and the routes.
"""
from __future__ import annotations

from typing import Iterable

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.routing import Match

from offset_cir import __version__
from offset_cir.search.index import Index
from offset_cir.search.inputs import short_repr
from offset_cir.search.service import routes
from offset_cir.search.service.document import EVERY_ROUTE, openapi_document, unique_id
from offset_cir.search.service.guards import (
    BodyLimit,
    HostCheck,
    RequestOutcome,
    SecurityHeaders,
    allowed_host_names,
    security_headers,
)
from offset_cir.search.service.state import (
    BATCH_WAIT,
    BODY_TIMEOUT,
    MAX_BATCH,
    MAX_CONCURRENCY,
    MAX_K,
    MAX_PIXELS,
    MAX_TEXT_CHARS,
    MAX_UPLOAD_BYTES,
    QUEUE_TIMEOUT,
    Service,
    ServiceLimits,
)


def create_app(index: Index, *, max_upload_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS,
               max_concurrency: int = MAX_CONCURRENCY, max_k: int = MAX_K, queue_timeout: float = QUEUE_TIMEOUT,
               max_text_chars: int = MAX_TEXT_CHARS, body_timeout: float | None = BODY_TIMEOUT,
               max_batch: int = MAX_BATCH, batch_wait: float = BATCH_WAIT,
               host: str | None = None, allowed_hosts: Iterable[str] = (), registry=None) -> FastAPI:
    """The FastAPI application over an opened ``index`` (never written to; its queries are batched from now on,
    ``Index.batch_queries(max_batch, batch_wait)``).

    ``host`` is the address the server is bound to; requests must name it, a loopback name or one of
    ``allowed_hosts`` (``"*"``: any) in their ``Host`` header. ``registry``: the prometheus_client
    CollectorRegistry for ``/metrics`` (default: a new one per app, ``app.state.metrics.registry``)."""
    limits = ServiceLimits(max_upload_bytes=max_upload_bytes, max_pixels=max_pixels,
                           max_concurrency=max_concurrency, max_k=max_k, max_text_chars=max_text_chars,
                           queue_timeout=queue_timeout, body_timeout=body_timeout, max_batch=max_batch,
                           batch_wait=batch_wait)
    hosts = allowed_host_names(host, allowed_hosts)
    service = Service.create(index, limits, registry)
    if index.mask_generator is not None:  # build the mask models now, once, not racing in two worker threads
        index.mask_generator.load()

    # no docs page: Swagger UI and ReDoc load scripts from a CDN, which the Content-Security-Policy forbids
    app = FastAPI(title="offset-cir search", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json", responses=EVERY_ROUTE, generate_unique_id_function=unique_id)
    app.openapi = lambda: openapi_document(app)
    app.state.service = service
    app.state.metrics = service.metrics
    app.state.security_headers = security_headers(service.page)  # also on the server's own answers (make_server)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    routes.add_routes(app)
    app.add_middleware(BodyLimit, limit=limits.max_upload_bytes, timeout=limits.body_timeout)
    app.add_middleware(HostCheck, hosts=hosts)
    app.add_middleware(RequestOutcome, metrics=service.metrics, route_of=lambda scope: route_of(app, scope))
    app.add_middleware(SecurityHeaders, headers=app.state.security_headers)
    return app


async def _invalid_request(request, exc: RequestValidationError):
    """FastAPI's own 422 would echo the client's value whole: name the fields only (``{"detail", "field"}``, as
    the form's refusals)."""
    names = ", ".join(".".join(str(p) for p in e.get("loc", ())[1:]) or "request" for e in exc.errors()[:5])
    return JSONResponse({"detail": f"invalid value for {short_repr(names)}", "field": names}, status_code=422)


def route_of(app: FastAPI, scope) -> str:
    """The route template a request matches (``/images/{image_id:path}``), for the metrics; ``unmatched`` when
    none does."""
    partial = None
    for r in app.router.routes:
        match, _ = r.matches(scope)
        if match == Match.FULL:
            return getattr(r, "path", "?")
        if match == Match.PARTIAL and partial is None:
            partial = getattr(r, "path", "?")
    return partial or "unmatched"
