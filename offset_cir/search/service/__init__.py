"""REST service and web page over a read-only search index (FastAPI; run with ``offset serve``).

``create_app(index, ...)`` (``app``) builds the application; ``make_server(app, ...)`` (``server``) the uvicorn
server that runs it. The rooms: ``routes`` (the routes), ``form`` (the search form -> a validated ``SearchQuery``,
upload decoding), ``document`` (the OpenAPI document, ``/openapi.json``: the answers as pydantic models),
``guards`` (middleware: body limit, Host check, security headers, request accounting; the search slots; path
scrubbing), ``metrics`` (Prometheus), ``state`` (what one app holds, its limits). The page is package data
(``offset_cir/search/static/index.html``). Load, robustness and security rules: docs/search.md.
"""
from __future__ import annotations

from offset_cir.search.service.app import create_app
from offset_cir.search.service.guards import allowed_host_names, host_of_header, public_message
from offset_cir.search.service.server import make_server

__all__ = ["allowed_host_names", "create_app", "host_of_header", "make_server", "public_message"]
