"""The service's guards: ASGI middleware (body size and time limits, the Host check, security headers, accounting
of every request), the cap on concurrent searches, and the scrubbing of server paths from messages.

Requests whose ``Host`` header is not the bound address, ``localhost``, ``127.0.0.1``, ``[::1]`` or an allowed host
are refused (DNS rebinding). Starlette's ``TrustedHostMiddleware`` is not used: it answers a plain-text body that
names nothing, and refuses ``[0:0:0:0:0:0:0:1]`` and ``localhost.`` (names this check normalises).
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import ipaddress
import json
import logging
import re
import time
from typing import Callable, Iterable

from fastapi import HTTPException
from starlette.requests import ClientDisconnect

from offset_cir.errors import UserInputError
from offset_cir.search.inputs import short_repr

log = logging.getLogger(__name__)

#: host names every server answers to (besides the address it is bound to and --allowed-host values)
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
#: methods counted by name in the request metrics; any other is counted as "other"
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
#: absolute POSIX paths inside a message (library errors name files; a client must not see server paths)
_ABS_PATH = re.compile(r"(?<![\w:/.~>-])/(?:[^\s'\"/,;()]+/)*[^\s'\"/,;()]+")


def public_message(message: str, known: Iterable[tuple[str, str]] = ()) -> str:
    """``message`` with every absolute path replaced, for a client's eyes.

    ``known`` pairs (folder on the server, public name) are replaced literally first, so a folder whose name holds
    spaces, commas or parentheses (``/home/J Smith/My Pictures``) cannot leak in pieces past the pattern; what
    follows such a folder is a path relative to it (a gallery id), which a client may see."""
    for folder, name in sorted(known, key=lambda kv: -len(kv[0])):
        if folder and folder != "/":
            message = message.replace(folder.rstrip("/"), name)
    return _ABS_PATH.sub("<file on the server>", message)


async def json_reply(send, status: int, detail: str, extra_headers=()) -> None:
    """Answer ``{"detail": ...}`` with ``status`` straight through ASGI ``send`` and close the connection."""
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *extra_headers]})
    await send({"type": "http.response.body", "body": body})


def _client(scope) -> str:
    c = scope.get("client")
    return f"{c[0]}:{c[1]}" if c else "?"


# ----------------------------------------------------------------------------------------------- body limits


class _BodyTooLarge(Exception):
    pass


class _BodyTimeout(Exception):
    pass


class BodyLimit:
    """ASGI middleware: refuse request bodies larger than ``limit`` bytes with 413, by header or while streaming,
    and bodies that have not arrived in full within ``timeout`` seconds with 408."""

    def __init__(self, app, limit: int, timeout: float | None = None):
        self.app = app
        self.limit = int(limit)
        self.timeout = float(timeout) if timeout else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    return await json_reply(send, 400, "Content-Length is not a number")
                if too_big:
                    return await json_reply(send, 413, self._msg())
        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, self._limited(receive), tracking_send)
        except _BodyTooLarge:
            if not started:
                await json_reply(send, 413, self._msg())
        except _BodyTimeout:
            log.info("request body of %s %s did not arrive within %.3g s; closing the connection",
                     scope.get("method"), scope.get("path"), self.timeout)
            if not started:
                await json_reply(send, 408, f"the request body did not arrive within {self.timeout:g} s")

    def _limited(self, receive):
        """``receive`` that counts the body's bytes and holds the body's deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout if self.timeout else None
        seen, body_done = 0, False

        async def limited_receive():
            nonlocal seen, body_done
            if body_done or deadline is None:
                message = await receive()
            else:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise _BodyTimeout()
                try:
                    message = await asyncio.wait_for(receive(), remaining)
                except (asyncio.TimeoutError, TimeoutError):
                    raise _BodyTimeout() from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge()
                if not message.get("more_body", False):
                    body_done = True  # later receives (disconnect listeners) have no deadline
            return message

        return limited_receive

    def _msg(self) -> str:
        return f"request body is larger than the limit of {self.limit} bytes"


# ----------------------------------------------------------------------------------------------- hosts


def _normal_host(name: str) -> str | None:
    """A host name as compared: lower case, no trailing dot, IP literals in canonical form, IPv6 in brackets."""
    name = name.strip().lower().rstrip(".")
    bare = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        return name if re.fullmatch(r"[a-z0-9_](?:[a-z0-9_.-]*[a-z0-9_])?", name) else None
    return f"[{ip.compressed}]" if ip.version == 6 else ip.compressed


def host_of_header(value: str) -> str | None:
    """The host part of a ``Host`` header (``example.org:8000`` -> ``example.org``, ``[::1]:80`` -> ``[::1]``)."""
    m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^:\[\]]+)(?::\d{1,5})?", value.strip())
    return _normal_host(m.group(1)) if m else None


def allowed_host_names(bound_host: str | None = None, extra: Iterable[str] = ()) -> frozenset[str] | None:
    """The names a ``Host`` header may carry; None when ``extra`` holds ``*`` (any host, e.g. behind a proxy)."""
    names = set(LOOPBACK_HOSTS)
    for h in ([bound_host] if bound_host else []) + list(extra):
        if h.strip() == "*":
            return None
        n = _normal_host(h)
        if n is None:
            raise UserInputError(f"--allowed-host {h!r} is not a host name or IP address")
        names.add(n)
    return frozenset(names)


class HostCheck:
    """ASGI middleware: answer 400 to a request whose ``Host`` header names none of ``hosts`` (None: any host)."""

    def __init__(self, app, *, hosts: frozenset[str] | None):
        self.app = app
        self.hosts = hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.hosts is not None:
            host = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"), None)
            name = host_of_header(host) if host is not None else None
            if name not in self.hosts:
                shown = short_repr(host, 60) if host is not None else "(none)"
                log.warning("refused a request with Host %s (allowed: %s; see --allowed-host)", shown,
                            ", ".join(sorted(self.hosts)))
                return await json_reply(send, 400, f"Host {shown} is not a name this server answers to")
        await self.app(scope, receive, send)


# ----------------------------------------------------------------------------------------------- headers


def _inline_hashes(html: str, tag: str) -> list[str]:
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
    return [f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks]


def security_headers(html: str) -> list[tuple[bytes, bytes]]:
    """Headers sent with every response. The page's inline script and style are allowed by their hashes."""
    csp = "; ".join([
        "default-src 'none'",
        "script-src " + (" ".join(_inline_hashes(html, "script")) or "'none'"),
        "style-src " + (" ".join(_inline_hashes(html, "style")) or "'none'"),
        "img-src 'self' blob:",  # gallery thumbnails and the preview of an uploaded file
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ])
    return [(b"content-security-policy", csp.encode()), (b"x-frame-options", b"DENY"),
            (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]


class SecurityHeaders:
    """ASGI middleware: ``headers`` on every response (replacing any the app set under the same names)."""

    def __init__(self, app, *, headers: Iterable[tuple[bytes, bytes]]):
        self.app = app
        self.headers = list(headers)
        self.names = {k for k, _ in self.headers}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def secured_send(message):
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in self.names]
                message = dict(message, headers=kept + self.headers)
            await send(message)

        await self.app(scope, receive, secured_send)


# ----------------------------------------------------------------------------------------------- accounting


class RequestOutcome:
    """ASGI middleware: count every request by route template, method and status (``metrics.requests``); a client
    that goes away costs one log line (status 499, nginx's code), an unexpected error one logged traceback and a
    JSON 500."""

    def __init__(self, app, *, metrics, route_of: Callable[[dict], str]):
        self.app = app
        self.metrics = metrics
        self.route_of = route_of

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = self.route_of(scope)
        status = None

        async def watched_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except ClientDisconnect:
            log.info("client %s went away during %s %s", _client(scope), scope.get("method"), scope.get("path"))
            status = status or 499
        except Exception:
            log.exception("error while answering %s %s", scope.get("method"), scope.get("path"))
            if status is None:
                await json_reply(watched_send, 500, "internal error; the server log has the details")
            status = 500
        finally:
            method = scope.get("method", "")  # h11 accepts any token: a label per invented method would grow forever
            self.metrics.requests.labels(route, method if method in HTTP_METHODS else "other",
                                         str(status or 500)).inc()


# ----------------------------------------------------------------------------------------------- search slots


class SearchSlots:
    """At most ``count`` searches run at once; the others wait for a slot, and one that has none within
    ``queue_timeout`` seconds gets a JSON 503 (``Retry-After: 1``). Waits, runs and refusals go to ``metrics``."""

    def __init__(self, count: int, queue_timeout: float, metrics):
        self.count = max(1, int(count))
        self.queue_timeout = float(queue_timeout)
        self.metrics = metrics
        self._sem = asyncio.Semaphore(self.count)

    @contextlib.asynccontextmanager
    async def slot(self):
        m = self.metrics
        waited = time.perf_counter()
        m.queue_depth.inc()
        try:
            await asyncio.wait_for(self._sem.acquire(), timeout=self.queue_timeout)
        except (asyncio.TimeoutError, TimeoutError):
            m.busy.inc()
            raise HTTPException(503, f"the server is busy: {self.count} search(es) running and this one found no "
                                     f"slot within {self.queue_timeout:g} s; try again shortly",
                                headers={"Retry-After": "1"}) from None
        finally:
            m.queue_depth.dec()
        m.seconds.labels("queue").observe(time.perf_counter() - waited)
        m.in_progress.inc()
        try:
            yield
        finally:
            self._sem.release()
            m.in_progress.dec()
