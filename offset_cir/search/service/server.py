"""The server ``offset serve`` runs: uvicorn with a deadline for each request head and for writes to a client that
reads nothing (``make_server``).

Request heads that take longer than ``header_timeout`` get 408 and are cut off; the only connection cap
(``max_connections``, hundreds) guards the process against exhaustion, not against load (searches have their own
cap, ``offset_cir.search.service.guards.SearchSlots``).
"""
from __future__ import annotations

import json

#: seconds for a request's head (request line + headers) to arrive, from the connection or the previous response
HEADER_TIMEOUT = 10.0
#: seconds a client may read nothing of a response (its socket buffer full) before it is disconnected
WRITE_TIMEOUT = 30.0
#: open connections beyond which uvicorn answers 503 at once (exhaustion guard, not a load limit)
MAX_CONNECTIONS = 512
KEEP_ALIVE = 5


def header_deadline_protocol(header_timeout: float, write_timeout: float = WRITE_TIMEOUT):
    """uvicorn's h11 protocol, plus a deadline for each request head: a connection that has not sent a complete
    request line and headers within ``header_timeout`` seconds of opening (or of the previous response) gets 408
    and is closed. (uvicorn's keep-alive timer stops at the first byte, so a trickling client would hold it.)
    And a write deadline: a client that stops reading a response (the socket's send buffer stays full) for
    ``write_timeout`` seconds is disconnected, so slow readers cannot hold connections either."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    timeout = float(header_timeout)
    write_limit = float(write_timeout)
    reply = json.dumps({"detail": f"the request head did not arrive within {timeout:g} s"}).encode()
    raw_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
               b"content-length: " + str(len(reply)).encode() + b"\r\n\r\n" + reply)

    class HeaderDeadlineProtocol(H11Protocol):
        _head_timer = None
        _write_timer = None

        def pause_writing(self):  # the transport's buffer is full: the client is not reading
            super().pause_writing()
            if self._write_timer is None:
                self._write_timer = self.loop.call_later(write_limit, self._write_deadline_passed)

        def resume_writing(self):
            super().resume_writing()
            if self._write_timer is not None:
                self._write_timer.cancel()
                self._write_timer = None

        def _write_deadline_passed(self):
            self._write_timer = None
            if not self.transport.is_closing():
                self.logger.info("client %s read nothing of its response for %g s; closing the connection",
                                 "%s:%s" % self.client if self.client else "?", write_limit)
                self.transport.abort()

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_head_deadline()

        def on_response_complete(self):
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_head_deadline()

        def connection_lost(self, exc):
            self._cancel_head_deadline()
            if self._write_timer is not None:
                self._write_timer.cancel()
                self._write_timer = None
            super().connection_lost(exc)

        def _arm_head_deadline(self):
            self._cancel_head_deadline()
            self._head_timer = self.loop.call_later(timeout, self._head_deadline_passed)

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
            if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
                self.logger.info("request head from %s did not arrive within %g s; closing the connection",
                                 "%s:%s" % self.client if self.client else "?", timeout)
                self.transport.write(raw_408)
            self.transport.close()

    return HeaderDeadlineProtocol


def make_server(app, *, host: str = "127.0.0.1", port: int = 8000, header_timeout: float = HEADER_TIMEOUT,
                write_timeout: float = WRITE_TIMEOUT,
                max_connections: int = MAX_CONNECTIONS, keep_alive: int = KEEP_ALIVE, log_level: str = "info",
                configure_logging: bool = True):
    """The uvicorn server ``offset serve`` runs (``.run()``, or ``.run(sockets=[sock])`` on a bound socket).
    ``configure_logging=False`` leaves logging as it is (uvicorn's records then reach the root logger)."""
    import uvicorn

    extra = {} if configure_logging else {"log_config": None}
    config = uvicorn.Config(app, host=host, port=port, workers=1, log_level=log_level, lifespan="off", **extra,
                            http=header_deadline_protocol(header_timeout, write_timeout),
                            limit_concurrency=int(max_connections),
                            timeout_keep_alive=int(keep_alive), server_header=False)
    return uvicorn.Server(config)
