"""The server ``offset serve`` runs: uvicorn with deadlines, a connection budget that slow clients cannot exhaust, and
answers of its own, with the security headers, where uvicorn would answer by itself (``make_server``).

What uvicorn and h11 answer without asking the application (a request they cannot parse, the connection cap) is
answered here in the application's form: JSON ``{"detail": ...}`` with the security headers. Request heads that take
longer than ``header_timeout`` get 408 and are cut off; a client that reads nothing of its response for
``write_timeout`` is disconnected. Connections that have not sent a complete request head may fill at most
``1 - REQUEST_SHARE`` of ``max_connections``: beyond that one of them is closed (``ConnectionBook`` says which), so a
flood of slow or idle connections leaves room for requests that arrive whole (searches have their own cap,
``offset_cir.search.service.guards.SearchSlots``).
"""
from __future__ import annotations

import collections
import http
import itertools
import json
import math
import sys
from typing import Iterable

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from offset_cir.search.service.guards import json_reply

#: seconds for a request's head (request line + headers) to arrive, from the connection or the previous response
HEADER_TIMEOUT = 10.0
#: seconds a client may read nothing of a response (its socket buffer full) before it is disconnected
WRITE_TIMEOUT = 30.0
#: open connections beyond which one waiting for its request head is closed (an exhaustion guard)
MAX_CONNECTIONS = 512
#: share of max_connections kept for connections whose request head has arrived
REQUEST_SHARE = 0.25
KEEP_ALIVE = 5
#: seconds a client refused for load is asked to wait (Retry-After)
RETRY_AFTER = 1
#: seconds between two warnings about connections closed to make room
SHED_REPORT_EVERY = 10.0


def raw_response(status: int, detail: str, headers: Iterable[tuple[bytes, bytes]] = ()) -> bytes:
    """A whole HTTP/1.1 response ``{"detail": detail}`` that closes the connection, as bytes for a transport."""
    body = json.dumps({"detail": detail}).encode()
    lines = [b"HTTP/1.1 %d %s" % (status, http.HTTPStatus(status).phrase.encode()),
             b"content-type: application/json", b"content-length: %d" % len(body), b"connection: close",
             *(k + b": " + v for k, v in headers)]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class ConnectionBook:
    """The open connections of one server that wait for a request head (new ones, and kept-alive ones between
    requests), and the rule that sheds them: at most ``max_waiting`` of them, and at most ``max_connections``
    connections in all. The one shed first belongs to the client address that holds the most waiting connections
    (a flood from one address sheds its own connections first), then is one that has sent part of a head and
    stalled (before one whose request may still be on its way), then one that has never had a request answered
    (before a kept-alive one of a client that has), then the one that has waited longest.

    A connection is anything with ``address`` (the client's), ``partial_head`` (whether it has sent part of a
    request head) and ``answered`` (requests answered on it) attributes."""

    def __init__(self, max_connections: int, request_share: float = REQUEST_SHARE):
        self.max_connections = max(1, int(max_connections))
        reserved = max(1, math.ceil(self.max_connections * request_share))
        self.max_waiting = max(1, self.max_connections - reserved)
        self.waiting: dict = {}  # connection -> the order it started waiting in
        self.closing: set = set()  # shed, not yet gone from the server's connection set
        self._order = itertools.count()
        self.shed_total = self.shed_since_report = self._reported_total = 0
        self._reported_at = -math.inf

    def wait(self, conn) -> None:
        """``conn`` waits for a request head (its place in line is kept while its head trickles in)."""
        if conn not in self.waiting and conn not in self.closing:
            self.waiting[conn] = next(self._order)

    def busy(self, conn) -> None:
        """``conn``'s request head has arrived."""
        self.waiting.pop(conn, None)

    def forget(self, conn) -> None:
        self.waiting.pop(conn, None)
        self.closing.discard(conn)

    def note_shed(self, now: float) -> bool:
        """Count one connection shed at ``now``; True when it is time to report (``shed_since_report`` then holds
        the count since the previous report)."""
        self.shed_total += 1
        if now - self._reported_at < SHED_REPORT_EVERY:
            return False
        self.shed_since_report = self.shed_total - self._reported_total
        self._reported_at, self._reported_total = now, self.shed_total
        return True

    def to_shed(self, open_connections: Iterable) -> list:
        """The waiting connections to close now, given the server's ``open_connections``."""
        still_open = sum(1 for c in open_connections if c not in self.closing)
        over = max(len(self.waiting) - self.max_waiting, still_open - self.max_connections, 0)
        per_address = collections.Counter(c.address for c in self.waiting)
        shed = []
        for _ in range(min(over, len(self.waiting))):
            conn = min(self.waiting, key=lambda c: (-per_address[c.address], not c.partial_head, c.answered > 0,
                                                        self.waiting[c]))
            per_address[conn.address] -= 1
            del self.waiting[conn]
            self.closing.add(conn)
            shed.append(conn)
        return shed


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol with this module's deadlines, connection budget and answers. Subclassed per server
    by :func:`guarded_protocol`, which sets the class attributes."""

    header_timeout: float = HEADER_TIMEOUT
    write_timeout: float = WRITE_TIMEOUT
    book: ConnectionBook
    #: the security headers every answer carries (``headers`` is uvicorn's: the request's)
    answer_headers: tuple = ()
    #: requests answered on this connection
    answered = 0
    _head_timer = None
    _write_timer = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.app = self._admitted(self.app)

    def _admitted(self, app):
        async def admit(scope, receive, send):
            if len(self.tasks) > self.book.max_connections:  # requests in progress (this one included)
                self.logger.warning("%d requests in progress: refusing %s %s with 503", len(self.tasks) - 1,
                                    scope.get("method"), scope.get("path"))
                return await json_reply(send, 503, f"the server is at its limit of {self.book.max_connections} "
                                                   f"requests in progress; try again shortly",
                                        [*self.answer_headers, (b"retry-after", str(RETRY_AFTER).encode())])
            await app(scope, receive, send)

        return admit

    def _client_name(self) -> str:
        return "%s:%s" % self.client if self.client else "?"

    @property
    def address(self) -> str:
        """The client's address (its port left out)."""
        return self.client[0] if self.client else "?"

    @property
    def partial_head(self) -> bool:
        """Whether part of a request head has arrived (and waits for the rest)."""
        return self.conn.their_state is h11.IDLE and bool(self.conn.trailing_data[0])

    # -- the connection budget
    def connection_made(self, transport):
        super().connection_made(transport)
        self.book.wait(self)
        self._arm_head_deadline()
        for conn in self.book.to_shed(self.connections):
            conn._shed(is_new=conn is self)

    def _note_progress(self) -> None:
        if self.transport is None or self.transport.is_closing():
            self.book.forget(self)
        elif self.cycle is not None and not self.cycle.response_complete:
            self.book.busy(self)
        else:
            self.book.wait(self)

    def _shed(self, is_new: bool) -> None:
        """Close this connection (it waits for a request head) to make room: a 503 when it is the newest or has
        sent part of a head, silently otherwise (an idle kept-alive connection a client will reopen). A warning
        at most every ``SHED_REPORT_EVERY`` seconds says how many were closed."""
        if self.transport.is_closing():
            return
        self.logger.debug("connection budget full: closing connection %s", self._client_name())
        if self.book.note_shed(self.loop.time()):
            self.logger.warning("connection budget full (%d open connections): %d connection(s) without a request "
                                "closed in the last %g s, the latest from %s", self.book.max_connections,
                                self.book.shed_since_report, SHED_REPORT_EVERY, self.address)
        if is_new or self.partial_head:
            self.transport.write(raw_response(
                503, "the server has too many open connections; try again shortly",
                [*self.answer_headers, (b"retry-after", str(RETRY_AFTER).encode())]))
        self._cancel_head_deadline()
        self.transport.close()

    def handle_events(self):
        super().handle_events()
        self._note_progress()

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot parse (uvicorn calls this inside its ``except h11.RemoteProtocolError``): JSON with
        h11's status (400, 431 a head too large, 501 an unsupported transfer coding) and its reason, at most
        80 characters of it."""
        exc = sys.exc_info()[1]
        status = getattr(exc, "error_status_hint", 400) if isinstance(exc, h11.RemoteProtocolError) else 400
        reason = str(exc) if exc is not None and str(exc) else msg
        reason = reason if len(reason) <= 80 else reason[:77] + "..."
        self.logger.info("malformed request from %s: %s", self._client_name(), reason)
        if self.cycle is not None and not self.cycle.response_complete:
            if self.cycle.response_started:  # an answer is under way: it cannot be replaced, only cut
                self.transport.close()
                return
            self.cycle.disconnected = True  # the application's answer, if any, is dropped
        self.transport.write(raw_response(status, f"malformed HTTP request: {reason}", self.answer_headers))
        self.transport.close()

    def on_response_complete(self):
        self.answered += 1
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_deadline()
        self._note_progress()

    def connection_lost(self, exc):
        self.book.forget(self)
        self._cancel_head_deadline()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        super().connection_lost(exc)

    # -- the write deadline: a client that stops reading a response (the send buffer stays full)
    def pause_writing(self):
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.write_timeout, self._write_deadline_passed)

    def resume_writing(self):
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_deadline_passed(self):
        self._write_timer = None
        if not self.transport.is_closing():
            self.logger.info("client %s read nothing of its response for %g s; closing the connection",
                             self._client_name(), self.write_timeout)
            self.transport.abort()

    # -- the head deadline (uvicorn's keep-alive timer stops at the first byte, so a trickling client would hold it)
    def _arm_head_deadline(self):
        self._cancel_head_deadline()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_deadline_passed)

    def _cancel_head_deadline(self):
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_deadline_passed(self):
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being answered (its body has its own deadline)
        if self.partial_head:
            self.logger.info("request head from %s did not arrive within %g s; closing the connection",
                             self._client_name(), self.header_timeout)
            self.transport.write(raw_response(
                408, f"the request head did not arrive within {self.header_timeout:g} s", self.answer_headers))
        self.transport.close()


def guarded_protocol(header_timeout: float = HEADER_TIMEOUT, write_timeout: float = WRITE_TIMEOUT,
                     max_connections: int = MAX_CONNECTIONS, headers: Iterable[tuple[bytes, bytes]] = ()):
    """A :class:`GuardedProtocol` class for one server: its deadlines, its own connection book, the security
    headers of its answers."""
    return type("GuardedProtocol", (GuardedProtocol,), {
        "header_timeout": float(header_timeout), "write_timeout": float(write_timeout),
        "book": ConnectionBook(max_connections), "answer_headers": tuple(headers)})


def make_server(app, *, host: str = "127.0.0.1", port: int = 8000, header_timeout: float = HEADER_TIMEOUT,
                write_timeout: float = WRITE_TIMEOUT, max_connections: int = MAX_CONNECTIONS,
                keep_alive: int = KEEP_ALIVE, log_level: str = "info", configure_logging: bool = True,
                headers: Iterable[tuple[bytes, bytes]] | None = None):
    """The uvicorn server ``offset serve`` runs (``.run()``, or ``.run(sockets=[sock])`` on a bound socket).
    ``headers``: the security headers of the server's own answers (default: the app's, ``create_app``'s
    ``app.state.security_headers``). ``configure_logging=False`` leaves logging as it is (uvicorn's records then
    reach the root logger)."""
    import uvicorn

    if headers is None:
        headers = getattr(getattr(app, "state", None), "security_headers", ())
    extra = {} if configure_logging else {"log_config": None}
    protocol = guarded_protocol(header_timeout, write_timeout, max_connections, headers)
    # limit_concurrency stays unset: the protocol enforces the connection budget and answers over-the-cap itself
    config = uvicorn.Config(app, host=host, port=port, workers=1, log_level=log_level, lifespan="off", **extra,
                            http=protocol, ws="none", timeout_keep_alive=int(keep_alive), server_header=False)
    return uvicorn.Server(config)
