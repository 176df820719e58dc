"""``POST /search``'s masks (every ``mask_mode``, the one a request implies, the 422 that lists what the server
offers), the mask echoed in every answer, ``GET /masks/{id}``, ``POST /suggest-mask``, the form's refusals over
HTTP and the form as OpenAPI documents it; in-process with FastAPI's TestClient and the pixel stand-in model."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from offset_cir.testing.photos import BoxMaskGenerator, make_photo  # noqa: E402
from offset_cir.testing.search import PixelModel, index_gallery  # noqa: E402

from offset_cir.search import Index  # noqa: E402
from offset_cir.search.service import create_app  # noqa: E402

torch.set_num_threads(1)
LOCAL = "http://localhost"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    base = tmp_path_factory.mktemp("routes")
    index_gallery(base, n=12)
    make_photo(base / "photo.png", (40, 30), seed=3)
    return base


@pytest.fixture(scope="module")
def index(base):
    return Index.open(base / "idx", model=PixelModel())


@pytest.fixture(scope="module")
def client(index):
    with TestClient(create_app(index), base_url=LOCAL) as c:
        yield c


@pytest.fixture(scope="module")
def generator():
    return BoxMaskGenerator(0.5)


@pytest.fixture(scope="module")
def piped(base, generator):
    """A client of a server with a mask pipeline (the stand-in)."""
    idx = Index.open(base / "idx", model=PixelModel(), mask_generator=generator)
    with TestClient(create_app(idx), base_url=LOCAL) as c:
        yield c, idx


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _box_mask(size, box) -> Image.Image:
    """Independent of the library: a numpy array with the box set."""
    a = np.zeros((size[1], size[0]), dtype=np.uint8)
    x0, y0, x1, y1 = box
    a[y0:y1, x0:x1] = 255
    return Image.fromarray(a, "L")


def _extent(mask: Image.Image) -> dict:
    """Coverage and bounding box of the dominant pixels (>= 128), computed here with numpy."""
    a = np.asarray(mask.convert("L")) >= 128
    rows, cols = np.nonzero(a)
    box = [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1] if rows.size else None
    return {"coverage": float(a.mean()), "box": box, "size": [a.shape[1], a.shape[0]]}


def _post(client, data, image=None, mask=None):
    files = {}
    if image is not None:
        files["image"] = ("photo.png", image, "image/png")
    if mask is not None:
        files["mask"] = ("mask.png", mask, "image/png")
    return client.post("/search", data=data, files=files or None)


def _check_answer(r, mode: str, mask: Image.Image, want_hits):
    assert r.status_code == 200, r.text
    body = r.json()
    echo = body["query"]["mask"]
    ext = _extent(mask)
    assert echo["mode"] == mode and echo["box"] == ext["box"] and echo["size"] == ext["size"]
    assert echo["coverage"] == pytest.approx(ext["coverage"], abs=1e-6)
    assert [x["id"] for x in body["results"]] == [h.id for h in want_hits]
    np.testing.assert_allclose([x["score"] for x in body["results"]], [h.score for h in want_hits], rtol=1e-5)
    return body


def test_health_lists_the_mask_modes(client, piped, base):
    assert client.get("/health").json()["mask_modes"] == ["uploaded", "whole", "stored"]
    assert piped[0].get("/health").json()["mask_modes"] == ["uploaded", "whole", "stored", "generated"]
    plain = Index.open(base / "idx", model=PixelModel(uses_masks=False), verify_checkpoint=False)
    with TestClient(create_app(plain), base_url=LOCAL) as c:
        assert c.get("/health").json()["mask_modes"] == []


def test_uploaded_mask_with_an_upload(client, index, base):
    photo = Image.open(base / "photo.png")
    mask = _box_mask(photo.size, (5, 4, 30, 20))
    want = index.search(photo, "make it red", k=5, mask=mask)
    for data in ({"text": "make it red", "k": "5"}, {"text": "make it red", "k": "5", "mask_mode": "uploaded"}):
        body = _check_answer(_post(client, data, _png(photo), _png(mask)), "uploaded", mask, want)
    assert body["query"]["mask"] == {"mode": "uploaded", "coverage": pytest.approx(25 * 16 / 1200),
                                     "box": [5, 4, 30, 20], "size": [40, 30]}


def test_whole_image(client, index, base):
    photo = Image.open(base / "photo.png")
    whole = Image.new("L", photo.size, 255)
    body = _check_answer(_post(client, {"text": "red", "k": "4", "mask_mode": "whole"}, _png(photo)), "whole", whole,
                         index.search(photo, "red", k=4, mask=whole))
    assert body["query"]["mask"]["coverage"] == 1.0 and body["query"]["mask"]["box"] == [0, 0, 40, 30]
    gallery = Image.open(base / "g" / "img002.png")
    full = Image.new("L", gallery.size, 255)
    q = index.encode_query(gallery, "red", mask=full)
    _check_answer(_post(client, {"text": "red", "k": "4", "ref_id": "img002", "mask_mode": "whole"}), "whole", full,
                  index.rank(q, 4, exclude_id="img002"))


def test_stored_mask_of_a_gallery_reference(client, index, base):
    stored = Image.open(base / "g" / "img002-segmask.png")
    want = index.search_id("img002", "blue", k=4)
    for data in ({"text": "blue", "k": "4", "ref_id": "img002"},
                 {"text": "blue", "k": "4", "ref_id": "img002", "mask_mode": "stored"}):
        body = _check_answer(_post(client, data), "stored", stored, want)
    assert body["query"]["reference"] == {"kind": "gallery", "id": "img002", "url": "/images/img002",
                                          "mask_url": "/masks/img002"}


def test_a_repainted_gallery_reference_uses_the_painted_mask(client, index, base):
    """ref_id with a mask: the mask sent replaces the stored one for this query (and only for it)."""
    gallery = Image.open(base / "g" / "img002.png")
    painted = _box_mask(gallery.size, (0, 0, 8, 24))
    q = index.encode_query(gallery, "blue", mask=painted)
    want = index.rank(q, 4, exclude_id="img002")
    body = _check_answer(_post(client, {"text": "blue", "k": "4", "ref_id": "img002"}, mask=_png(painted)),
                         "uploaded", painted, want)
    stored = index.search_id("img002", "blue", k=4)
    assert [x["score"] for x in body["results"]] != pytest.approx([h.score for h in stored])
    assert "img002" not in [x["id"] for x in body["results"]]
    again = _post(client, {"text": "blue", "k": "4", "ref_id": "img002"}).json()
    assert again["query"]["mask"]["mode"] == "stored"  # the stored mask is untouched


def test_generated_mask(piped, generator, base):
    c, idx = piped
    photo = Image.open(base / "photo.png")
    made = _box_mask(photo.size, generator.box(photo.size))
    want = idx.search(photo, "green", k=3, mask=made)
    calls = generator.calls
    for data in ({"text": "green", "k": "3"}, {"text": "green", "k": "3", "mask_mode": "generated"}):
        _check_answer(_post(c, data, _png(photo)), "generated", made, want)
    assert generator.calls == calls + 2
    gallery = Image.open(base / "g" / "img005.png")
    g_made = _box_mask(gallery.size, generator.box(gallery.size))
    q = idx.encode_query(gallery, "green", mask=g_made)
    _check_answer(_post(c, {"text": "green", "k": "3", "ref_id": "img005", "mask_mode": "generated"}), "generated",
                  g_made, idx.rank(q, 3, exclude_id="img005"))


@pytest.mark.parametrize("data, upload, mask, field, phrase", [
    ({"text": "red"}, True, False, "mask_mode", "the request gives none"),
    ({"text": "red", "mask_mode": "generated"}, True, False, "mask_mode", "'generated' is not offered"),
    ({"text": "red", "mask_mode": "painted"}, True, False, "mask_mode", "'mask_mode' is 'painted'"),
    ({"text": "red", "mask_mode": "uploaded"}, True, False, "mask", "needs a 'mask' file"),
    ({"text": "red", "mask_mode": "whole"}, True, True, "mask", "send no 'mask'"),
    ({"text": "red", "mask_mode": "stored"}, True, False, "mask_mode", "give 'ref_id'"),
])
def test_a_request_no_offered_mode_fits_gets_422_listing_them(client, base, data, upload, mask, field, phrase):
    photo = Image.open(base / "photo.png")
    r = _post(client, data, _png(photo) if upload else None, _png(Image.new("L", photo.size, 255)) if mask else None)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field and phrase in r.json()["detail"]
    if field == "mask_mode":
        assert "this server offers mask_mode uploaded, whole, stored" in r.json()["detail"]


def test_a_model_without_masks_says_no_mask_was_used(base):
    plain = Index.open(base / "idx", model=PixelModel(uses_masks=False), verify_checkpoint=False)
    photo = Image.open(base / "photo.png")
    with TestClient(create_app(plain), base_url=LOCAL) as c:
        r = _post(c, {"text": "red", "k": "3"}, _png(photo))
    assert r.status_code == 200, r.text
    assert r.json()["query"]["mask"] == {"mode": "none", "coverage": None, "box": None, "size": None}
    assert [x["id"] for x in r.json()["results"]] == [h.id for h in plain.search(photo, "red", k=3)]


def test_a_mask_of_another_size_is_refused_naming_the_mask_field(client, base):
    r = _post(client, {"text": "red", "ref_id": "img002"}, mask=_png(Image.new("L", (40, 30), 255)))
    assert r.status_code == 422 and r.json()["field"] == "mask"
    assert "40x30" in r.json()["detail"] and "24x24" in r.json()["detail"]


def test_an_upright_photo_takes_a_mask_of_its_upright_size(client, index, base):
    """A JPEG whose EXIF orientation turns it (6: 90 degrees) is searched upright, as the browser shows it and a
    person paints over it."""
    raw = Image.open(base / "photo.png")  # 40x30 as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    raw.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    upright = raw.transpose(Image.Transpose.ROTATE_270)  # what orientation 6 shows: 30x40
    mask = _box_mask(upright.size, (2, 3, 20, 30))
    r = _post(client, {"text": "red", "k": "3"}, buf.getvalue(), _png(mask))
    assert r.status_code == 200, r.text
    assert r.json()["query"]["mask"]["size"] == [30, 40] and r.json()["query"]["mask"]["box"] == [2, 3, 20, 30]


def test_stored_masks_are_served_by_id(client, base, index):
    r = client.get("/masks/sub/img004")
    assert r.status_code == 200 and r.content == (base / "g" / "sub" / "img004-segmask.png").read_bytes()
    assert client.get("/masks/img999").status_code == 404
    assert client.get("/masks/..%2Fidx%2Fmanifest.json").status_code == 404
    page = client.get("/gallery", params={"limit": 2}).json()["images"]
    assert [x["mask_url"] for x in page] == [f"/masks/{i}" for i in index.ids[:2]]
    hits = _post(client, {"text": "red", "k": "2", "ref_id": "img001"}).json()["results"]
    assert [x["mask_url"] for x in hits] == [f"/masks/{x['id']}" for x in hits]


def test_suggest_mask(piped, client, generator, base):
    c, _ = piped
    photo = Image.open(base / "photo.png")
    r = c.post("/suggest-mask", files={"image": ("p.png", _png(photo), "image/png")})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    got = Image.open(io.BytesIO(r.content))
    assert got.size == photo.size
    want = _box_mask(photo.size, generator.box(photo.size))
    np.testing.assert_array_equal(np.asarray(got.convert("L")), np.asarray(want))
    r = c.post("/suggest-mask", data={"ref_id": "sub/img004"})
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (24, 24)
    refused = client.post("/suggest-mask", data={"ref_id": "img001"})
    assert refused.status_code == 422 and refused.json()["field"] == "mask_mode"
    assert "no mask pipeline" in refused.json()["detail"] and "uploaded, whole, stored" in refused.json()["detail"]
    assert c.post("/suggest-mask", data={"ref_id": "img001", "text": "x"}).json()["field"] == "'text'"


# -- the form's refusals over HTTP: each names its field


def test_a_repeated_field_is_refused(client):
    r = client.post("/search", content=b"text=red&text=blue&ref_id=img001",
                    headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 422 and r.json()["field"] == "text"
    assert "field 'text' was sent 2 times" in r.json()["detail"]


@pytest.mark.parametrize("k", ["1_0", " 5 ", "\uff15"])
def test_k_in_other_spellings_is_refused(client, k):
    r = client.post("/search", data={"text": "red", "ref_id": "img001", "k": k})
    assert r.status_code == 422 and r.json()["field"] == "k" and "in the digits 0-9" in r.json()["detail"]


def test_zero_width_text_is_refused(client):
    r = client.post("/search", data={"text": "\u200b\u200c\u200d\ufeff", "ref_id": "img001"})
    assert r.status_code == 422 and r.json()["field"] == "text" and "no visible character" in r.json()["detail"]


def test_a_5000_character_field_name_is_named(client):
    name = "q" * 5000
    body = (b"--XX\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\nred\r\n"
            b"--XX\r\nContent-Disposition: form-data; name=\"" + name.encode() + b"\"\r\n\r\n1\r\n--XX--\r\n")
    r = client.post("/search", content=body, headers={"content-type": "multipart/form-data; boundary=XX"})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == repr("q" * 40) + "\u2026 (5000 characters)"
    assert "field name 'qqqq" in r.json()["detail"] and "(5000 characters) is too long" in r.json()["detail"]
    assert len(r.content) < 500


def test_the_form_as_openapi_documents_it(index):
    """The /search form's fields with this app's limits and mask modes (for /openapi.json)."""
    app = create_app(index, max_k=7, max_text_chars=99)
    body = app.openapi()["paths"]["/search"]["post"]["requestBody"]["content"]
    form = body["multipart/form-data"]["schema"]
    assert set(form["properties"]) == {"text", "k", "image", "mask", "ref_id", "mask_mode"}
    assert form["required"] == ["text"] and [o["required"] for o in form["oneOf"]] == [["image"], ["ref_id"]]
    assert (form["properties"]["text"]["maxLength"], form["properties"]["k"]["maximum"]) == (99, 7)
    assert form["properties"]["mask_mode"]["enum"] == ["uploaded", "whole", "stored", "generated"]
    assert "offers: uploaded, whole, stored." in form["properties"]["mask_mode"]["description"]
    assert form["properties"]["image"]["format"] == "binary"
    assert "image" not in body["application/x-www-form-urlencoded"]["schema"]["properties"]
    suggest = app.openapi()["paths"]["/suggest-mask"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert set(suggest["schema"]["properties"]) == {"image", "ref_id"}
    assert "image/png" in app.openapi()["paths"]["/suggest-mask"]["post"]["responses"]["200"]["content"]
