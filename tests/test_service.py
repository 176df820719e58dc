"""The REST service (offset_cir.search.service) in-process with FastAPI's TestClient and a stand-in model."""
from __future__ import annotations

import hashlib
import io
import struct
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_search_support import FakeModel, make_gallery  # noqa: E402

from offset_cir.search import Index, build_index  # noqa: E402
from offset_cir.search.service import create_app  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    base = tmp_path_factory.mktemp("svc")
    make_gallery(base / "g", n=16)
    model = FakeModel()
    build_index(base / "idx", base / "g", model=model, progress=False, device="cpu", distributed=False)
    return base, model


@pytest.fixture(scope="module")
def index(gallery):
    base, model = gallery
    return Index.open(base / "idx", model=model)


@pytest.fixture(scope="module")
def client(index):
    with TestClient(create_app(index, max_upload_bytes=200_000, max_pixels=1_000_000)) as c:
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
    assert body["query"]["mask"] == "uploaded" and body["query"]["reference"] == {"kind": "upload"}
    assert body["results"][0]["url"] == f"/images/{want[0].id}"
    assert all("path" not in x for x in body["results"])  # no server paths leave the service
    assert str(base) not in r.text


def test_gallery_reference_uses_stored_mask(client, index):
    r = client.post("/search", data={"text": "more red", "k": "4", "ref_id": "sub/img004"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["id"] for x in body["results"]] == [h.id for h in index.search_id("sub/img004", "more red", k=4)]
    assert "sub/img004" not in [x["id"] for x in body["results"]]
    assert body["query"]["mask"] == "stored"


def test_mask_required_for_upload_without_mask(client, gallery):
    base, _ = gallery
    r = client.post("/search", data={"text": "red", "k": "3"}, files=_files((base / "g" / "img001.png").read_bytes()))
    assert r.status_code == 422 and "trained with masks" in r.json()["detail"]


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
    assert h["status"] == "ok" and h["images"] == 16 and h["needs_masks"] is True and h["read_only"] is True
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


def test_bounded_concurrency_returns_503_when_busy(gallery):
    base, _ = gallery
    slow = FakeModel()
    idx = Index.open(base / "idx", model=slow)
    gate, entered = threading.Event(), threading.Event()
    real = slow.encode_query

    def blocking(*a, **kw):
        entered.set()
        gate.wait(10)
        return real(*a, **kw)

    slow.encode_query = blocking
    app = create_app(idx, max_concurrency=1, queue_timeout=0.3)
    results = []
    with TestClient(app) as c:
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
    assert second.status_code == 503 and "busy" in second.json()["detail"]
    assert results == [200] and third.status_code == 200
