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
    """30 thumbnails, the page, gallery and health, and 12 searches at once: all 200 (uvicorn's connection limit
    was 8 before), while at most max_concurrency searches run."""
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
