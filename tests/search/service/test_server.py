"""The service as `offset serve` runs it (service.make_server: uvicorn + the head-deadline protocol) on 127.0.0.1,
over real HTTP and raw sockets: a page load during searches, slow clients, Host checks, clients that go away.
Every wait is bounded."""
from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
from offset_cir.testing.search import PixelModel, index_gallery, make_gallery  # noqa: E402
from offset_cir.testing.service import metric_value, serve_in_thread  # noqa: E402

from offset_cir.search import Index, build_index  # noqa: E402
from offset_cir.search.service import create_app  # noqa: E402

torch.set_num_threads(1)


class SlowQueries(PixelModel):
    """The stand-in model, with query encoding that takes a while and records how many run at once."""

    def __init__(self, seconds=0.1):
        super().__init__()
        self.seconds = seconds
        self.running = 0
        self.peak = 0
        self.lock = threading.Lock()

    def encode_query(self, *a, **kw):
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            time.sleep(self.seconds)
            return super().encode_query(*a, **kw)
        finally:
            with self.lock:
                self.running -= 1


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("http")
    index_gallery(base, n=30)
    return base


def test_page_load_during_searches_all_answered(built):
    """30 thumbnails, the page, gallery and health, and 12 searches at once: all 200 (more connections at once than
    uvicorn's own limit of 8 would admit), while at most max_concurrency searches run."""
    model = SlowQueries(0.1)
    index = Index.open(built / "idx", model=model)
    ids = index.ids

    async def burst(base):
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=base, trust_env=False, limits=limits, timeout=30) as c:
            calls = [c.get(f"/images/{i}") for i in ids[:30]]
            calls += [c.post("/search", data={"text": f"make it red {j}", "k": "5", "ref_id": ids[j]})
                      for j in range(12)]
            calls += [c.get("/"), c.get("/gallery", params={"limit": 24}), c.get("/health")]
            return await asyncio.wait_for(asyncio.gather(*calls), 60)

    with serve_in_thread(create_app(index, max_concurrency=2)) as base:
        answers = asyncio.run(burst(base))
        metrics = httpx.get(base + "/metrics", trust_env=False, timeout=10).text
    assert [r.status_code for r in answers] == [200] * len(answers), [r.text[:200] for r in answers
                                                                       if r.status_code != 200][:3]
    assert all(r.headers["content-type"] == "image/png" for r in answers[:30])
    assert [len(r.json()["results"]) for r in answers[30:42]] == [5] * 12
    assert 1 <= model.peak <= 2  # the search semaphore, not the connection count, limits the work
    assert metric_value(metrics, "offset_http_requests_total", route="/images/{image_id:path}", status="200") == 30
    assert metric_value(metrics, "offset_http_requests_total", route="/search", status="200") == 12


def _trickle(port: int, head: bytes, body: bytes = b"", every: float = 0.2, limit: float = 8.0):
    """Send ``head`` at once when ``body`` is given (then trickle the body), else trickle the head; one byte per
    ``every`` seconds until the server closes the connection or ``limit`` seconds pass.
    Returns (what the server sent, whether it closed the connection, seconds)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.settimeout(every)
    got, closed, start = b"", False, time.monotonic()
    try:
        slow = body if body else head
        if body:
            s.sendall(head)
        for i in range(len(slow)):
            try:
                s.sendall(slow[i:i + 1])
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            try:
                data = s.recv(65536)
                if not data:
                    closed = True
                    break
                got += data
            except socket.timeout:
                pass
            except ConnectionResetError:
                # the server closed with bytes of ours unread, and its reset overtook the end of stream (timing):
                # closed as well; what it sent before is already in ``got``
                closed = True
                break
            if time.monotonic() - start > limit:
                break
        if closed:  # read what is left (bounded)
            s.settimeout(1)
            try:
                while data := s.recv(65536):
                    got += data
            except (socket.timeout, ConnectionResetError):
                pass
    finally:
        s.close()
    return got, closed, time.monotonic() - start


def test_slow_request_head_is_cut_off(built):
    index = Index.open(built / "idx", model=PixelModel())
    with serve_in_thread(create_app(index), header_timeout=1.0) as base:
        port = int(base.rsplit(":", 1)[1])
        head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n"
        got, closed, _ = _trickle(port, head)
        # a connection that sends nothing at all is closed too
        idle = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            idle_closed = idle.recv(100) == b""
        except (socket.timeout, ConnectionResetError):
            idle_closed = False
        idle.close()
        ok = httpx.get(base + "/health", trust_env=False, timeout=10)  # a normal request is unaffected
    assert closed and got.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in got, got
    assert idle_closed  # (closed by the server: the 8 s and 5 s client-side bounds were not reached)
    assert ok.status_code == 200


def test_slow_request_body_gets_408(built):
    index = Index.open(built / "idx", model=PixelModel())
    with serve_in_thread(create_app(index, body_timeout=1.0), header_timeout=1.0) as base:
        port = int(base.rsplit(":", 1)[1])
        body = b"--XX\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\n" + b"r" * 400
        head = (b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=XX\r\n"
                b"Content-Length: %d\r\n\r\n" % (len(body) + 100))
        got, closed, _ = _trickle(port, head, body)
    assert closed and got.startswith(b"HTTP/1.1 408"), got
    assert b"request body did not arrive within 1 s" in got


def _raw_get(port: int, host_header: bytes | None, path: bytes = b"/health") -> bytes:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        req = b"GET " + path + b" HTTP/1.1\r\n" + (b"Host: " + host_header + b"\r\n" if host_header else b"")
        s.sendall(req + b"Connection: close\r\n\r\n")
        got = b""
        while data := s.recv(65536):
            got += data
        return got
    finally:
        s.close()


def test_host_header_must_name_this_server(built):
    index = Index.open(built / "idx", model=PixelModel())
    app = create_app(index, host="127.0.0.1", allowed_hosts=["search.example.org"])
    with serve_in_thread(app) as base:
        port = int(base.rsplit(":", 1)[1])
        p = str(port).encode()
        answers = {h: _raw_get(port, h) for h in (b"127.0.0.1:" + p, b"localhost:" + p, b"LOCALHOST", b"[::1]:" + p,
                                                 b"search.example.org", b"attacker.example:" + p,
                                                 b"127.0.0.1.attacker.example", b"localhost:" + p + b"@evil")}
        images = _raw_get(port, b"rebind.example", b"/images/img001")
    ok = [h for h, a in answers.items() if a.startswith(b"HTTP/1.1 200")]
    refused = [h for h, a in answers.items() if a.startswith(b"HTTP/1.1 400")]
    assert ok == [b"127.0.0.1:" + p, b"localhost:" + p, b"LOCALHOST", b"[::1]:" + p, b"search.example.org"]
    assert refused == [b"attacker.example:" + p, b"127.0.0.1.attacker.example", b"localhost:" + p + b"@evil"]
    assert b"is not a name this server answers to" in answers[b"attacker.example:" + p]
    assert images.startswith(b"HTTP/1.1 400") and b"\x89PNG" not in images
    # refusals carry the security headers too
    assert b"content-security-policy: default-src 'none'" in answers[b"attacker.example:" + p].lower()


def test_client_that_goes_away_logs_one_line_not_a_traceback(built, caplog):
    index = Index.open(built / "idx", model=PixelModel())
    caplog.set_level(logging.INFO)
    with serve_in_thread(create_app(index)) as base:
        port = int(base.rsplit(":", 1)[1])
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=XX\r\n"
                  b"Content-Length: 5000\r\n\r\n--XX\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\nred")
        time.sleep(0.3)
        s.close()
        metrics = ""
        for _ in range(100):  # bounded: at most ~10 s for the server to notice
            metrics = httpx.get(base + "/metrics", trust_env=False, timeout=10).text
            if metric_value(metrics, "offset_http_requests_total", route="/search", status="499"):
                break
            time.sleep(0.1)
    assert metric_value(metrics, "offset_http_requests_total", route="/search", status="499") == 1
    assert any("went away" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.exc_info or "Exception in ASGI" in r.getMessage()]


def test_client_that_stops_reading_is_disconnected(tmp_path):
    """The mirror of the slow sender: a client that requests a large file and reads nothing must not hold the
    connection (and a --max-connections slot) forever; after --write-timeout it is cut off."""
    make_gallery(tmp_path / "g", n=3)
    build_index(tmp_path / "idx", tmp_path / "g", model=PixelModel(), progress=False, device="cpu", distributed=False)
    index = Index.open(tmp_path / "idx", model=PixelModel())
    size = 48 << 20  # far more than loopback's socket buffers on both sides hold
    with open(index.item("img001")["path"], "r+b") as f:  # served as a file, never decoded on this route
        f.truncate(size)
    with serve_in_thread(create_app(index), header_timeout=5.0, write_timeout=1.0) as base:
        port = int(base.rsplit(":", 1)[1])
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET /images/img001 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        time.sleep(4.0)  # read nothing: the server's buffer fills and stays full past the 1 s write deadline
        sock.settimeout(10)
        got, closed = 0, False
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # bounded drain of what was buffered before the cut
            try:
                chunk = sock.recv(1 << 20)
            except (ConnectionResetError, socket.timeout):
                closed = True
                break
            if not chunk:
                closed = True
                break
            got += len(chunk)
        sock.close()
        ok = httpx.get(base + "/health", trust_env=False, timeout=10)
    assert closed and got < size, (closed, got, size)
    assert ok.status_code == 200


# ----------------------------------------------------------------------------------------------- the server's answers

SECURITY_HEADERS = ("content-security-policy", "x-frame-options", "x-content-type-options", "referrer-policy")


def _raw(port: int, data: bytes, wait: float = 10.0, source: str | None = None) -> bytes:
    """Send ``data`` on a new connection and read until the server closes it (bounded by ``wait`` seconds)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5,
                                 source_address=(source, 0) if source else None)
    got, deadline = b"", time.monotonic() + wait
    try:
        s.sendall(data)
        s.settimeout(1.0)
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                break
            got += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass
    finally:
        s.close()
    return got


def _parse(raw: bytes) -> tuple[int, dict, bytes]:
    """(status, headers with lower-case names, body) of one raw HTTP/1.1 response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def _assert_ours(raw: bytes, status: int, phrase: str):
    """A JSON answer of ``status`` whose detail holds ``phrase``, with the four security headers."""
    import json

    got, headers, body = _parse(raw)
    assert got == status, raw[:300]
    assert all(h in headers for h in SECURITY_HEADERS), headers
    assert "default-src 'none'" in headers["content-security-policy"] and headers["x-frame-options"] == "DENY"
    assert headers["x-content-type-options"] == "nosniff" and headers["referrer-policy"] == "no-referrer"
    assert headers["content-type"] == "application/json"
    assert phrase in json.loads(body)["detail"], body
    return headers


@pytest.mark.parametrize("request_bytes, status, phrase", [
    (b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n", 400, "Content-Length"),
    (b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -5\r\n\r\n", 400, "Content-Length"),
    (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: 127.0.0.1\r\n\r\n", 400, "multiple Host"),
    (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Name: x\r\n\r\n", 400, "malformed HTTP request"),
    (b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501, "Transfer-Encoding"),
], ids=["content-length-abc", "content-length-negative", "two-host-headers", "bad-header-name", "gzip-coding"])
def test_requests_h11_cannot_parse_get_our_json_answer(built, request_bytes, status, phrase):
    """uvicorn answers these itself (h11 refuses them before the application sees them): plain text and no
    security headers, unless the server's protocol answers them."""
    index = Index.open(built / "idx", model=PixelModel())
    with serve_in_thread(create_app(index)) as base:
        got = _raw(int(base.rsplit(":", 1)[1]), request_bytes)
    _assert_ours(got, status, phrase)


def test_head_and_body_timeouts_carry_the_security_headers(built):
    index = Index.open(built / "idx", model=PixelModel())
    with serve_in_thread(create_app(index, body_timeout=1.0), header_timeout=1.0) as base:
        port = int(base.rsplit(":", 1)[1])
        head = _raw(port, b"GET /health HTTP/1.1\r\nHost: 127.0")  # and nothing more
        body = _raw(port, b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                          b"boundary=XX\r\nContent-Length: 500\r\n\r\n--XX\r\n")
    _assert_ours(head, 408, "request head did not arrive within 1 s")
    _assert_ours(body, 408, "request body did not arrive within 1 s")


def _wait_until(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_over_the_cap_503_has_retry_after_and_the_security_headers(built):
    """Beyond --max-connections: a new connection while every open one has a request in progress, and a request
    while more requests are in progress than the cap (those of clients that left still run)."""
    model = SlowQueries(2.0)
    index = Index.open(built / "idx", model=model)
    form = b"text=red&ref_id=img001"
    search = (b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
              b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(form), form))
    with serve_in_thread(create_app(index, max_concurrency=4, max_batch=1), max_connections=2) as base:
        port = int(base.rsplit(":", 1)[1])
        holders = [threading.Thread(target=_raw, args=(port, search)) for _ in range(2)]
        for n, t in enumerate(holders, 1):  # one after the other: each search encoding before the next connects
            t.start()
            _wait_until(lambda: model.running == n)
        full = _raw(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        for t in holders:
            t.join(20)
    headers = _assert_ours(full, 503, "too many open connections")
    assert headers["retry-after"] == "1"

    with serve_in_thread(create_app(index, max_concurrency=4, max_batch=1), max_connections=1) as base:
        port = int(base.rsplit(":", 1)[1])
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(search)
        _wait_until(lambda: model.running == 1)
        s.close()  # the client leaves; its search runs on
        time.sleep(0.3)
        busy = _raw(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    headers = _assert_ours(busy, 503, "requests in progress")
    assert headers["retry-after"] == "1"


def test_head_health_is_answered_as_get_without_a_body(built):
    index = Index.open(built / "idx", model=PixelModel())
    with serve_in_thread(create_app(index)) as base:
        port = int(base.rsplit(":", 1)[1])
        get = _raw(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        head = _raw(port, b"HEAD /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        page = _raw(port, b"HEAD / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    (gs, gh, gbody), (hs, hh, hbody) = _parse(get), _parse(head)
    assert gs == hs == 200 and hbody == b"" and gbody
    assert hh["content-type"] == gh["content-type"] == "application/json"
    assert int(hh["content-length"]) == len(gbody)
    assert all(h in hh for h in SECURITY_HEADERS)
    assert _parse(page)[0] == 200 and _parse(page)[2] == b""


class _SlowConnectionFlood:
    """Holds ``n`` connections from ``source`` that send part of a request head and trickle a byte now and then,
    opening a new one for every connection the server closes, until stopped."""

    def __init__(self, port: int, n: int, source: str):
        self.port, self.n, self.source = port, n, source
        self.opened = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _open(self):
        s = socket.create_connection(("127.0.0.1", self.port), timeout=2, source_address=(self.source, 0))
        s.setblocking(False)
        s.send(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        self.opened += 1
        return s

    def _alive(self, s) -> bool:
        try:
            s.send(b"X")
            if s.recv(4096) == b"":
                return False
        except BlockingIOError:
            pass
        except OSError:
            return False
        return True

    def _run(self):
        socks = []
        while not self.stop.is_set():
            while len(socks) < self.n and not self.stop.is_set():
                try:
                    socks.append(self._open())
                except OSError:
                    time.sleep(0.01)
            time.sleep(0.05)
            keep = [s for s in socks if self._alive(s)]
            for s in set(socks) - set(keep):
                s.close()
            socks = keep
        for s in socks:
            s.close()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(10)


def test_a_page_loads_during_a_slow_connection_flood(built):
    """40 slow connections against --max-connections 20, reconnecting as fast as the server closes them: the
    page, the gallery, /health and 8 thumbnails are all answered. (The flood comes from another loopback address,
    as a remote attacker's would; a flood from the page's own address is shed oldest-first, stalled heads first.)"""
    try:
        probe = socket.socket()
        probe.bind(("127.0.0.2", 0))
        probe.close()
    except OSError:
        pytest.skip("no second loopback address (127.0.0.2) on this machine")
    index = Index.open(built / "idx", model=PixelModel())

    async def page(base):
        limits = httpx.Limits(max_connections=6)
        async with httpx.AsyncClient(base_url=base, trust_env=False, limits=limits, timeout=20) as c:
            calls = [c.get("/"), c.get("/gallery"), c.get("/health")]
            calls += [c.get(f"/images/{i}") for i in index.ids[:8]]
            return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 60)

    with serve_in_thread(create_app(index), header_timeout=3.0, max_connections=20) as base:
        port = int(base.rsplit(":", 1)[1])
        with _SlowConnectionFlood(port, 40, "127.0.0.2") as flood:
            time.sleep(1.0)  # the flood fills the connection budget
            answers = asyncio.run(page(base))
            opened = flood.opened
    assert [getattr(r, "status_code", repr(r)) for r in answers] == [200] * len(answers)
    assert opened > 40  # the flood kept reconnecting: its connections were shed to make room


def test_connection_book_sheds_the_flooding_address_first_then_stalled_heads_then_the_oldest():
    from offset_cir.search.service.server import ConnectionBook

    class Conn:
        def __init__(self, name, address, partial=False, answered=0):
            self.name, self.address, self.partial_head, self.answered = name, address, partial, answered

        def __repr__(self):
            return self.name

    book = ConnectionBook(8)  # a quarter kept for requests: at most 6 waiting for a head
    assert (book.max_connections, book.max_waiting) == (8, 6)
    a1, a2, a3 = Conn("a1", "10.0.0.1"), Conn("a2", "10.0.0.1", partial=True), Conn("a3", "10.0.0.1")
    b1, b2 = Conn("b1", "10.0.0.2", answered=3), Conn("b2", "10.0.0.2")
    c1 = Conn("c1", "10.0.0.3", partial=True)
    busy = Conn("busy", "10.0.0.4")
    for c in (a1, b1, a2, b2, a3, c1):
        book.wait(c)
    everything = [a1, b1, a2, b2, a3, c1, busy]
    assert book.to_shed(everything) == []  # 6 waiting, 7 open: within the budget
    late = Conn("late", "10.0.0.2")
    book.wait(late)
    # 7 waiting: one goes, from 10.0.0.1 (3 waiting), the stalled head first
    assert book.to_shed(everything + [late]) == [a2]
    d1 = Conn("d1", "10.0.0.5")
    book.wait(d1)
    # 9 open minus the one shed (still closing) = 8 = the cap; 7 waiting again: 10.0.0.1 and 10.0.0.2 hold 2 and
    # 3: the never-answered oldest of 10.0.0.2 (b2) goes before the one that has had 3 answers (b1)
    assert book.to_shed(everything + [late, d1]) == [b2]
    book.forget(a2)
    book.forget(b2)
    book.busy(late)  # its head arrived
    e1, e2, e3 = Conn("e1", "10.0.0.6"), Conn("e2", "10.0.0.6"), Conn("e3", "10.0.0.6")
    for c in (e1, e2, e3):
        book.wait(c)
    # waiting a1 b1 a3 c1 d1 e1 e2 e3 (8 > 6); open: those and busy, late (10 > 8): two go. 10.0.0.6 holds the
    # most (3): its oldest, e1; then 10.0.0.1 and 10.0.0.6 hold 2 each, none stalled or answered: the oldest, a1
    assert book.to_shed([a1, b1, a3, c1, busy, late, d1, e1, e2, e3]) == [e1, a1]
    book.busy(c1)
    assert book.to_shed([a1, b1, a3, c1, busy, late, d1, e1, e2, e3]) == []  # a1, e1 closing: 8 open, 5 waiting
