"""``POST /search`` with a 1 x 100,000 upload and its 1 x 100,000 mask (and the 100,000 x 1 shape), over the real
tiny OFFSET: answered, and at a memory cost bounded by the model's input and the decoded copies of the uploads, not
by the strip's length (preprocessing reads only what its centre crop keeps)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

import offset_cir  # noqa: E402
from offset_cir.testing.memory import peak_growth, peak_measurable  # noqa: E402
from offset_cir.testing.search import index_gallery  # noqa: E402

from offset_cir.search import Index  # noqa: E402
from offset_cir.search.service import create_app  # noqa: E402

pytestmark = pytest.mark.skipif(not peak_measurable(), reason="needs Linux /proc/self/clear_refs to read peak memory")
torch.set_num_threads(1)

S = 64  # the tiny backbone's input side
MODEL_INPUT_BYTES = 3 * S * S * 4
PIXELS = 100_000
THIN, WIDE, ORDINARY = (1, PIXELS), (PIXELS, 1), (316, 316)  # (width, height); ORDINARY has 99,856 pixels
# one decoded copy of a strip: 4 bytes a pixel (PIL keeps RGB as RGBX) and PIL's pointer to each of up to
# 100,000 rows: 1.2 MB
COPY_BYTES = 4 * PIXELS + 8 * PIXELS
# The request's own work: two decoded copies each of image and mask (the upload decoded, then converted to RGB for
# the model), 4.8 MB, and 16 times the model's input for preprocessing and encoding (0.8 MB): about 5.5 MiB.
# RSS moves by whole pages and allocator arenas besides what the request needs: up to 8 MiB allowed for that, as
# tests/model/test_preprocess_paths.py does. Resizing the whole strip first (its short side to 64) would make a
# 64 x 6,400,000 image of 1.6 GB for each of image and mask.
OUTPUT_MULTIPLE = 16
NOISE_BYTES = 8 * 2**20
BUDGET = 2 * 2 * COPY_BYTES + OUTPUT_MULTIPLE * MODEL_INPUT_BYTES + NOISE_BYTES


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """The service over 6 gallery images and the tiny OFFSET (random weights), which uses masks."""
    torch.manual_seed(0)
    model = offset_cir.build_model(offset_cir.ModelConfig(backbone="tiny")).eval()
    base = tmp_path_factory.mktemp("thin")
    index_gallery(base, n=6, model=model)
    app = create_app(Index.open(base / "idx", model=model))
    with TestClient(app, base_url="http://localhost") as c:
        yield c


def _png(array: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


def _upload(size: tuple[int, int], seed: int = 0) -> dict:
    """An image of random pixels and a mask that marks its first half, as files of a search form."""
    w, h = size
    rng = np.random.default_rng(seed)
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[: max(1, h // 2), : max(1, w // 2)] = 255
    return {"image": ("photo.png", _png(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB"), "image/png"),
            "mask": ("mask.png", _png(mask, "L"), "image/png")}


def _trimmed():
    """Memory the allocator holds free given back to the system (glibc), so that the next peak counts every page a
    request touches, not only those beyond what an earlier request left resident."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _search(client, files):
    return client.post("/search", data={"text": "make it red", "k": "3", "mask_mode": "uploaded"}, files=files)


@pytest.mark.parametrize("size", [THIN, WIDE], ids=["1x100000", "100000x1"])
def test_a_strip_and_its_mask_cost_what_the_model_input_and_decoded_copies_cost(client, size):
    ordinary = _upload(ORDINARY)
    assert _search(client, ordinary).status_code == 200  # warm: threads, arenas, the model's first call
    strip = _upload(size, seed=1)
    _trimmed()
    r, grew = peak_growth(_search, client, strip)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"]["mask"]["size"] == list(size) and body["query"]["mask"]["mode"] == "uploaded"
    assert len(body["results"]) == 3
    _trimmed()
    _, grew_ordinary = peak_growth(_search, client, ordinary)
    assert grew <= BUDGET, (f"{grew / 2**20:.1f} MiB for a {size[0]}x{size[1]} upload (budget {BUDGET / 2**20:.1f} "
                            f"MiB; an ordinary {ORDINARY[0]}x{ORDINARY[1]} upload: {grew_ordinary / 2**20:.1f} MiB)")
