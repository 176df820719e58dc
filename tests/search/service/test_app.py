"""The REST service (offset_cir.search.service.create_app and its routes) in-process with FastAPI's TestClient and a
stand-in model."""
from __future__ import annotations

import hashlib
import io
import re
import struct
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from offset_cir.testing.search import PixelModel, index_gallery, make_gallery  # noqa: E402
from offset_cir.testing.service import metric_value  # noqa: E402

from offset_cir.search import Index, build_index  # noqa: E402
from offset_cir.search.service import create_app  # noqa: E402

torch.set_num_threads(1)
LOCAL = "http://localhost"  # the TestClient's default host, testserver, is not one the service answers to


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    base = tmp_path_factory.mktemp("svc")
    return base, index_gallery(base, n=16)


@pytest.fixture(scope="module")
def index(gallery):
    base, model = gallery
    return Index.open(base / "idx", model=model)


@pytest.fixture(scope="module")
def client(index):
    with TestClient(create_app(index, max_upload_bytes=200_000, max_pixels=1_000_000), base_url=LOCAL) as c:
        yield c


def _png(size=(32, 32), color=(10, 200, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def _files(image=None, mask=None):
    f = {}
    if image is not None:
        f["image"] = ("ref.png", image, "image/png")
    if mask is not None:
        f["mask"] = ("mask.png", mask, "image/png")
    return f


def test_valid_upload_search_matches_python_api(client, index, gallery):
    base, _ = gallery
    ref = base / "g" / "img003.png"
    mask = base / "g" / "img003-segmask.png"
    r = client.post("/search", data={"text": "make it blue", "k": "5"},
                    files=_files(ref.read_bytes(), mask.read_bytes()))
    assert r.status_code == 200, r.text
    body = r.json()
    want = index.search(ref, "make it blue", k=5, mask=mask)
    assert [x["id"] for x in body["results"]] == [h.id for h in want]
    np.testing.assert_allclose([x["score"] for x in body["results"]], [h.score for h in want], rtol=1e-6)
    assert [x["rank"] for x in body["results"]] == [1, 2, 3, 4, 5]
    assert body["query"]["reference"] == {"kind": "upload"}
    marked = np.argwhere(np.asarray(Image.open(mask).convert("L")) >= 128)  # (row, col) of dominant pixels
    (y0, x0), (y1, x1) = marked.min(axis=0), marked.max(axis=0) + 1
    assert body["query"]["mask"] == {"mode": "uploaded", "coverage": len(marked) / (24 * 24),
                                     "box": [int(x0), int(y0), int(x1), int(y1)], "size": [24, 24]}
    assert body["results"][0]["url"] == f"/images/{want[0].id}"
    assert all("path" not in x for x in body["results"])  # no server paths leave the service
    assert str(base) not in r.text


def test_gallery_reference_uses_stored_mask(client, index):
    r = client.post("/search", data={"text": "more red", "k": "4", "ref_id": "sub/img004"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["id"] for x in body["results"]] == [h.id for h in index.search_id("sub/img004", "more red", k=4)]
    assert "sub/img004" not in [x["id"] for x in body["results"]]
    assert body["query"]["mask"]["mode"] == "stored"


def test_mask_required_for_upload_without_mask(client, gallery):
    base, _ = gallery
    r = client.post("/search", data={"text": "red", "k": "3"}, files=_files((base / "g" / "img001.png").read_bytes()))
    assert r.status_code == 422 and r.json()["field"] == "mask_mode"
    assert "needs a mask" in r.json()["detail"]
    assert "this server offers mask_mode uploaded, whole, stored" in r.json()["detail"]


@pytest.mark.parametrize("data,files,status,phrase", [
    ({"k": "3"}, "png", 422, "'text' is required"),
    ({"text": "   ", "k": "3"}, "png", 422, "'text' is required"),
    ({"text": "x" * 501, "k": "3"}, "png", 422, "limit is 500"),
    ({"text": "red", "k": "0"}, "png", 422, "'k' must be"),
    ({"text": "red", "k": "ten"}, "png", 422, "'k' must be"),
    ({"text": "red", "k": "101"}, "png", 422, "'k' must be"),
    ({"text": "red"}, None, 422, "exactly one reference"),
    ({"text": "red", "ref_id": "img001"}, "png", 422, "exactly one reference"),
    ({"text": "red", "ref_id": "nope"}, None, 404, "no gallery image"),
    ({"text": "red", "evil": "1"}, "png", 422, "unknown field"),
    ({"text": "red", "image": "a-string"}, None, 422, "must be file uploads"),
])
def test_malformed_requests(client, data, files, status, phrase):
    r = client.post("/search", data=data, files=_files(_png(), _png(mode="L", color=255)) if files else None)
    assert r.status_code == status, r.text
    assert phrase in r.json()["detail"]


def test_non_image_upload_is_415(client):
    r = client.post("/search", data={"text": "red"}, files={"image": ("x.png", b"%PDF-1.4 not an image", "image/png"),
                                                             "mask": ("m.png", _png(mode="L", color=255), "image/png")})
    assert r.status_code == 415 and "not an image" in r.json()["detail"]
    r = client.post("/search", data={"text": "red"}, files={"image": ("x.png", b"", "image/png")})
    assert r.status_code == 422 and "empty file" in r.json()["detail"]


def test_json_body_is_415(client):
    r = client.post("/search", json={"text": "red", "ref_id": "img001"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]


def test_oversize_body_is_413(client):
    big = np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="PNG")
    assert len(buf.getvalue()) > 200_000
    r = client.post("/search", data={"text": "red"}, files=_files(buf.getvalue()))
    assert r.status_code == 413 and "larger than the limit" in r.json()["detail"]


def test_too_many_pixels_is_413(client):
    # a 1100x1000 single-colour PNG compresses to a few KB but has 1.1 M pixels (limit 1 M)
    data = _png(size=(1100, 1000))
    assert len(data) < 200_000
    r = client.post("/search", data={"text": "red"}, files=_files(data, _png(mode="L", color=255)))
    assert r.status_code == 413 and "1100x1000" in r.json()["detail"]


def _png_claiming(width, height) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb's calling card)."""
    raw = bytearray(_png(size=(1, 1)))
    assert raw[12:16] == b"IHDR"
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])) & 0xFFFFFFFF)
    return bytes(raw)


def test_decompression_bomb_is_413_before_decoding(client):
    r = client.post("/search", data={"text": "red"},
                    files=_files(_png_claiming(100_000, 100_000), _png(mode="L", color=255)))
    assert r.status_code == 413, r.text
    # below PIL's own bomb threshold but above the service's limit: refused from the header alone
    r = client.post("/search", data={"text": "red"}, files=_files(_png_claiming(5000, 5000), _png(mode="L", color=255)))
    assert r.status_code == 413 and "5000x5000" in r.json()["detail"]


def test_images_by_id_only(client, gallery):
    base, _ = gallery
    r = client.get("/images/sub/img004")
    assert r.status_code == 200
    assert hashlib.sha256(r.content).digest() == hashlib.sha256((base / "g" / "sub" / "img004.png").read_bytes()).digest()
    assert client.get("/images/img999").status_code == 404


@pytest.mark.parametrize("url", [
    "/images/..%2F..%2Fetc%2Fpasswd",
    "/images/%2Fetc%2Fpasswd",
    "/images//etc/passwd",
    "/images/sub/..%2F..%2Fidx%2Fmanifest.json",
    "/images/img001-segmask",
    "/images/%2e%2e/%2e%2e/etc/passwd",
    "/images/img001.png",
    "/images/sub%2F..%2Fimg001",
])
def test_path_traversal_attempts_are_404(client, url):
    r = client.get(url)
    assert r.status_code == 404
    assert b"root:" not in r.content and b"offset-cir-index" not in r.content


def test_health_page_and_gallery(client, index):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["images"] == 16 and h["uses_masks"] is True and h["read_only"] is True
    assert h["needs_masks"] is True  # the same fact under the name clients read before "uses_masks"
    page = client.get("/")
    assert page.status_code == 200 and 'id="results"' in page.text and page.headers["content-type"].startswith("text/html")
    g = client.get("/gallery", params={"offset": 10, "limit": 4}).json()
    assert g["total"] == 16 and [x["id"] for x in g["images"]] == index.ids[10:14]
    assert client.get("/gallery", params={"limit": 1000}).status_code == 422


def test_index_is_not_written_while_serving(client, gallery):
    base, _ = gallery
    before = {p: p.read_bytes() for p in (base / "idx").rglob("*") if p.is_file()}
    for _ in range(3):
        client.post("/search", data={"text": "red", "ref_id": "img001"})
    after = {p: p.read_bytes() for p in (base / "idx").rglob("*") if p.is_file()}
    assert before == after


def test_features_mapping_is_read_only(index):
    with pytest.raises(ValueError):
        index.features[0, 0] = 1


def _index_with_held_queries(base):
    """The index over a model whose query encoding waits for ``gate`` (set ``entered`` first): (index, gate, entered)."""
    slow = PixelModel()
    gate, entered = threading.Event(), threading.Event()
    real = slow.encode_query

    def blocking(*a, **kw):
        entered.set()
        gate.wait(10)
        return real(*a, **kw)

    slow.encode_query = blocking
    return Index.open(base / "idx", model=slow), gate, entered


def test_bounded_concurrency_returns_503_when_busy(gallery):
    idx, gate, entered = _index_with_held_queries(gallery[0])
    app = create_app(idx, max_concurrency=1, queue_timeout=0.3)
    results = []
    with TestClient(app, base_url=LOCAL) as c:
        t = threading.Thread(target=lambda: results.append(
            c.post("/search", data={"text": "red", "ref_id": "img001"}).status_code))
        t.start()
        try:
            assert entered.wait(10)  # the first request holds the only slot
            second = c.post("/search", data={"text": "red", "ref_id": "img002"})
        finally:
            gate.set()
            t.join(20)
        third = c.post("/search", data={"text": "red", "ref_id": "img002"})
        metrics = c.get("/metrics").text
    assert second.status_code == 503 and "busy" in second.json()["detail"]
    assert second.headers["content-type"] == "application/json" and second.headers["retry-after"] == "1"
    assert results == [200] and third.status_code == 200
    assert metric_value(metrics, "offset_search_busy_total") == 1
    assert metric_value(metrics, "offset_http_requests_total", route="/search", method="POST", status="503") == 1
    assert metric_value(metrics, "offset_http_requests_total", route="/search", method="POST", status="200") == 2


def test_queue_depth_while_a_search_waits(gallery):
    idx, gate, entered = _index_with_held_queries(gallery[0])
    results = {}
    with TestClient(create_app(idx, max_concurrency=1, queue_timeout=20), base_url=LOCAL) as c:
        def ask(name, ref):
            results[name] = c.post("/search", data={"text": "red", "ref_id": ref}).status_code

        first = threading.Thread(target=ask, args=("first", "img001"))
        second = threading.Thread(target=ask, args=("second", "img002"))
        first.start()
        try:
            assert entered.wait(10)
            second.start()
            waiting = ""
            for _ in range(200):  # bounded: the second search shows up in the queue
                waiting = c.get("/metrics").text
                if metric_value(waiting, "offset_search_queue_depth") == 1:
                    break
                time.sleep(0.05)
        finally:
            gate.set()
            first.join(20)
            second.join(20)
        after = c.get("/metrics").text
    assert metric_value(waiting, "offset_search_queue_depth") == 1 and metric_value(waiting, "offset_search_in_progress") == 1
    assert results == {"first": 200, "second": 200}
    assert metric_value(after, "offset_search_queue_depth") == 0 and metric_value(after, "offset_search_in_progress") == 0
    assert metric_value(after, "offset_search_seconds_count", stage="queue") == 2


def test_metrics_count_requests_and_stages(index, gallery):
    base, _ = gallery
    app = create_app(index, max_upload_bytes=200_000)
    other = create_app(index)  # a second app in the same process keeps its own counts
    ref, mask = base / "g" / "img003.png", base / "g" / "img003-segmask.png"
    with TestClient(app, base_url=LOCAL) as c, TestClient(other, base_url=LOCAL) as c_other:
        for i in range(3):
            assert c.post("/search", data={"text": f"red {i}", "ref_id": "img001"}).status_code == 200
        up = c.post("/search", data={"text": "blue"}, files=_files(ref.read_bytes(), mask.read_bytes()))
        assert up.status_code == 200
        assert c.post("/search", data={"k": "3", "ref_id": "img001"}).status_code == 422
        assert c.get("/images/sub/img004").status_code == 200
        assert c.get("/images/nope").status_code == 404
        assert c.get("/no-such-route").status_code == 404
        assert c_other.get("/health").status_code == 200
        page = c.get("/metrics")
        other_page = c_other.get("/metrics").text
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain; version=")
    m = page.text
    req = "offset_http_requests_total"
    assert metric_value(m, req, route="/search", method="POST", status="200") == 4
    assert metric_value(m, req, route="/search", method="POST", status="422") == 1
    assert metric_value(m, req, route="/images/{image_id:path}", status="200") == 1
    assert metric_value(m, req, route="/images/{image_id:path}", status="404") == 1
    assert metric_value(m, req, route="unmatched", status="404") == 1
    assert metric_value(m, req, route="/health") == 0  # the other app's request is not here
    assert metric_value(other_page, req, route="/health", status="200") == 1
    assert metric_value(other_page, req, route="/search") == 0
    # latency histograms: encode and search apart, one observation per answered search; decode only for the upload
    for stage, n in (("queue", 4), ("encode", 4), ("search", 4), ("total", 4), ("decode", 1)):
        assert metric_value(m, "offset_search_seconds_count", stage=stage) == n, stage
    assert metric_value(m, "offset_search_seconds_sum", stage="encode") > 0
    assert metric_value(m, "offset_index_images") == len(index)
    assert metric_value(m, "offset_model_info", checkpoint_hash=index.manifest["checkpoint"]["hash"], dim="16") == 1


def test_security_headers_on_every_response(client):
    answers = [client.get("/"), client.get("/health"), client.get("/gallery"), client.get("/images/sub/img004"),
               client.get("/images/nope"), client.get("/metrics"), client.post("/search", data={"text": "x"}),
               client.post("/search", content=b"x" * 300_000, headers={"content-type": "multipart/form-data; b=1"})]
    assert [r.status_code for r in answers] == [200, 200, 200, 200, 404, 200, 422, 413]
    for r in answers:
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp, r.url
        assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"
        assert len(r.headers.get_list("x-content-type-options")) == 1
    # the page's inline script and style are allowed by their hashes, nothing else runs
    import base64
    import re

    html = answers[0].text
    csp = answers[0].headers["content-security-policy"]
    for tag, directive in (("script", "script-src"), ("style", "style-src")):
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        assert blocks
        allowed = re.search(rf"{directive} ([^;]*)", csp).group(1).split()
        want = ["'sha256-" + base64.b64encode(hashlib.sha256(b.encode()).digest()).decode() + "'" for b in blocks]
        assert allowed == want
    assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp


def test_host_header_is_checked(index):
    app = create_app(index)
    with TestClient(app) as c:  # TestClient's default Host: testserver
        r = c.get("/health")
        assert r.status_code == 400 and "'testserver' is not a name this server answers to" in r.json()["detail"]
        assert c.get("/health", headers={"host": "127.0.0.1:8000"}).status_code == 200
        assert c.get("/health", headers={"host": "[::1]:8000"}).status_code == 200
        assert c.get("/health", headers={"host": "evil.example"}).status_code == 400
    with TestClient(create_app(index, allowed_hosts=["*"])) as c:
        assert c.get("/health").status_code == 200


def test_unterminated_multipart_is_called_malformed(client):
    body = (b"--XX\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\nred\r\n"
            b"--XX\r\nContent-Disposition: form-data; name=\"ref_id\"\r\n\r\nimg001")  # no closing --XX--
    r = client.post("/search", content=body, headers={"content-type": "multipart/form-data; boundary=XX"})
    assert r.status_code == 400 and "malformed multipart" in r.json()["detail"], r.text
    assert "exactly one reference" not in r.text
    ok = client.post("/search", content=body + b"\r\n--XX--\r\n",
                     headers={"content-type": "multipart/form-data; boundary=XX"})
    assert ok.status_code == 200, ok.text


def test_long_client_strings_are_not_echoed_whole(client):
    long_id = "x" * 60_000  # (form fields over 64 KiB are refused by the form parser, 400)
    for r in (client.post("/search", data={"text": "red", "ref_id": long_id}),
              client.post("/search", data={"text": "red", "ref_id": long_id}, files=_files(None, _png())),
              client.get("/images/" + "y" * 60_000),
              client.post("/search", data={"text": "red", "ref_id": "img001", "k": "9" * 60_000}),
              client.post("/search", data={"text": "red", "ref_id": "img001", "z" * 30_000: "1"}),
              client.get("/gallery", params={"offset": "x" * 60_000})):
        assert r.status_code in (404, 422) and len(r.content) < 500, (r.status_code, len(r.content))
        assert "characters)" in r.json()["detail"]


def test_pixel_limit_message_quotes_the_service_limit(client):
    from PIL import Image as PILImage

    r = client.post("/search", data={"text": "red"},
                    files=_files(_png_claiming(100_000, 100_000), _png(mode="L", color=255)))
    assert r.status_code == 413
    detail = r.json()["detail"]
    assert "100000x100000" in detail and "limit is 1000000 pixels" in detail, detail
    assert str(PILImage.MAX_IMAGE_PIXELS) not in detail


def test_mask_of_another_size_is_422_naming_both(client):
    r = client.post("/search", data={"text": "red"}, files=_files(_png(size=(64, 64)),
                                                                   _png(size=(200, 50), mode="L", color=255)))
    assert r.status_code == 422, r.text
    assert "200x50" in r.json()["detail"] and "64x64" in r.json()["detail"]


def test_deleted_gallery_file_answer_has_no_server_path(tmp_path):
    make_gallery(tmp_path / "g", n=6)
    model = PixelModel()
    build_index(tmp_path / "idx", tmp_path / "g", model=model, progress=False, device="cpu", distributed=False)
    idx = Index.open(tmp_path / "idx", model=model)
    (tmp_path / "g" / "img001.png").unlink()
    (tmp_path / "g" / "img002-segmask.png").unlink()  # a stored mask gone: the library's message names the file
    with TestClient(create_app(idx), base_url=LOCAL) as c:
        answers = [c.post("/search", data={"text": "red", "ref_id": "img001"}), c.get("/images/img001"),
                   c.post("/search", data={"text": "red", "ref_id": "img002"})]
    assert [r.status_code for r in answers] == [404, 404, 422]
    assert "no longer on disk" in answers[0].json()["detail"]
    for r in answers:
        assert str(tmp_path) not in r.text and "/tmp" not in r.text, r.text
    # a file under the gallery is named relative to it, as the ids a client already sees
    assert "reference mask <gallery>/img002-segmask.png does not exist" in answers[2].json()["detail"]


def test_allowed_host_names():
    from offset_cir.errors import UserInputError
    from offset_cir.search.service import allowed_host_names, host_of_header

    names = allowed_host_names("::1", ["Search.Example.org.", "192.168.1.4"])
    assert names == {"localhost", "127.0.0.1", "[::1]", "search.example.org", "192.168.1.4"}
    assert allowed_host_names("0.0.0.0", ["*"]) is None
    assert [host_of_header(h) for h in ("[0:0:0:0:0:0:0:1]:80", "LocalHost:8000", "a.b:99999999", "x y")] == [
        "[::1]", "localhost", None, None]
    with pytest.raises(UserInputError, match="--allowed-host 'not a host!'"):
        allowed_host_names(None, ["not a host!"])


def test_invented_http_methods_share_one_metrics_series(client):
    """Any token is a method to h11: each must not become its own series (unbounded /metrics from one client)."""
    for i in range(20):
        client.request(f"XYZZY{i}", "/health")
    page = client.get("/metrics").text
    methods = {m for m in re.findall(r'offset_http_requests_total\{[^}]*method="([^"]*)"', page)}
    assert "other" in methods and not any(m.startswith("XYZZY") for m in methods), methods


def test_server_folders_with_spaces_do_not_leak_into_answers():
    """A gallery under '/…/My Pictures (old), 2024' named in a library error reaches the client as <gallery>/…"""
    from offset_cir.search.service import public_message

    root = "/home/J Smith/My Pictures (old), 2024"
    msg = f"reference mask {root}/sub/a-segmask.png is 200x50 but its image {root}/sub/a.png is 64x64"
    out = public_message(msg, [(root, "<gallery>")])
    assert "Smith" not in out and "Pictures" not in out and "/home" not in out, out
    assert "<gallery>/sub/a-segmask.png is 200x50" in out and "64x64" in out
    assert public_message(f"{root}/x.png") != f"{root}/x.png"  # the pattern alone still hides the start


def test_concurrent_searches_are_encoded_together(gallery):
    """Six searches at once: the first holds the model; the five that arrive meanwhile are encoded in one call
    (the batch-size histogram), and every answer is the one an unbatched index gives."""
    base, _ = gallery
    idx, gate, entered = _index_with_held_queries(base)
    app = create_app(idx, max_concurrency=8, max_batch=8, batch_wait=1.0)  # waits only for searches on their way
    refs = ["img001", "img002", "img003", "img005", "img006", "img007"]
    answers = {}
    with TestClient(app, base_url=LOCAL) as c:
        def ask(ref):
            answers[ref] = c.post("/search", data={"text": f"make it red {ref}", "k": "5", "ref_id": ref})

        threads = [threading.Thread(target=ask, args=(refs[0],))]
        threads[0].start()
        try:
            assert entered.wait(10)  # the first query is in the model
            threads += [threading.Thread(target=ask, args=(r,)) for r in refs[1:]]
            for t in threads[1:]:
                t.start()
            for _ in range(200):  # bounded: the five wait for the model
                if metric_value(c.get("/metrics").text, "offset_search_in_progress") == 6:
                    break
                time.sleep(0.02)
            time.sleep(0.1)
        finally:
            gate.set()
            for t in threads:
                t.join(30)
        metrics = c.get("/metrics").text
    assert metric_value(metrics, "offset_query_batch_size_sum") == 6
    assert metric_value(metrics, "offset_query_batch_size_count") == 2  # the first alone, then the five together
    plain = Index.open(base / "idx", model=PixelModel())
    for ref in refs:
        assert answers[ref].status_code == 200, answers[ref].text
        want = plain.search_id(ref, f"make it red {ref}", k=5)
        got = answers[ref].json()["results"]
        assert [x["id"] for x in got] == [h.id for h in want]
        np.testing.assert_allclose([x["score"] for x in got], [h.score for h in want], rtol=0, atol=1e-5)


def test_health_says_which_precision_runs(gallery):
    base, _ = gallery
    for asked in ("fp32", "bf16"):
        idx = Index.open(base / "idx", model=PixelModel(), precision=asked)
        with TestClient(create_app(idx), base_url=LOCAL) as c:
            h = c.get("/health").json()
            r = c.post("/search", data={"text": "red", "k": "3", "ref_id": "img001"})
        assert h["precision"]["precision"] == h["precision"]["requested"] == asked
        assert h["limits"]["max_batch"] == 8 and r.status_code == 200
