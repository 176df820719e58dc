"""The search package's structure: its rooms (format, builder, index, service) import one another without a circle
and touch no private name of another module; modules stay small; one checkpoint hash, one rule for which files are
images and where their masks are, the data package's ImageDataset for gallery encoding, one torchrun module shared
with training, and no print in library code."""
from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import offset_cir.search
from offset_cir.masks.layout import find_images, find_mask, mask_beside, scan_images
from offset_cir.testing.search import PixelModel

SEARCH_DIR = Path(offset_cir.search.__file__).parent
ROOT = SEARCH_DIR.parents[1]
#: a library module's and a function's size limits (the project's rules)
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 500, 80


def _search_modules():
    for info in pkgutil.walk_packages([str(SEARCH_DIR)], prefix="offset_cir.search."):
        if info.name.startswith("offset_cir.search.service") and importlib.util.find_spec("fastapi") is None:
            continue
        yield importlib.import_module(info.name)


def _search_files() -> list[Path]:
    return sorted(SEARCH_DIR.rglob("*.py"))


def test_one_checkpoint_hash():
    """No search module has a checkpoint_hash of its own: the checkpoint module's is the only one."""
    from offset_cir.model.checkpoint import checkpoint_hash

    for mod in [offset_cir.search, *_search_modules()]:
        assert getattr(mod, "checkpoint_hash", checkpoint_hash) is checkpoint_hash, mod.__name__


def _touch_image(path: Path, size=(8, 8), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, 128).save(path)


def test_images_and_masks_follow_one_rule(tmp_path):
    """`offset masks` (find_images) and `offset index` (scan_images) agree on which files are images; masks are
    found beside the image, mirrored under a masks folder, or flat there."""
    root = tmp_path / "g"
    for rel in ("a.png", "b.jpg", "sub/d.png"):
        _touch_image(root / rel)
    for rel in ("a-segmask.png", "b-seg.png", "sub/d-segmask.jpg", "cat_segmask/e-seg.png", ".hidden.png",
                "UPPER-SEGMASK.PNG"):
        _touch_image(root / rel, mode="L")
    want = sorted([root / "a.png", root / "b.jpg", root / "sub" / "d.png"])
    assert find_images("images", root) == want
    assert sorted(p for _, p in scan_images(root)) == [p.resolve() for p in want]
    assert [i for i, _ in scan_images(root)] == ["a", "b", "sub/d"]

    assert find_mask(root / "a.png") == (root / "a-segmask.png").resolve()
    assert find_mask(root / "b.jpg") == (root / "b-seg.png").resolve()
    assert find_mask(root / "sub" / "d.png", root) == (root / "sub" / "d-segmask.jpg").resolve()
    masks = tmp_path / "m"
    _touch_image(masks / "sub" / "x-segmask.png", mode="L")  # mirrored
    _touch_image(masks / "y-seg.png", mode="L")  # flat
    assert find_mask(root / "sub" / "x.png", root, masks) == (masks / "sub" / "x-segmask.png").resolve()
    assert find_mask(root / "sub" / "y.png", root, masks) == (masks / "y-seg.png").resolve()
    assert find_mask(root / "z.png", root, masks) is None
    made = tmp_path / "made" / "z-segmask.png"
    _touch_image(made, mode="L")
    assert find_mask(root / "z.png", root, masks, generated=made) == made.resolve()


def test_loaders_use_the_layout_mask_rule():
    from offset_cir.data import common

    assert common.mask_beside is mask_beside
    assert mask_beside(Path("/r/s/img.jpg"), Path("/r"), Path("/m"), "-segmask.png") == Path("/m/s/img-segmask.png")
    assert mask_beside(Path("/r/s/img.jpg"), Path("/r"), None, "-seg.png") == Path("/r/s/img-seg.png")


def test_gallery_encoding_uses_the_data_package_dataset(tmp_path):
    """No Dataset class of its own in search; ImageDataset reports an unreadable file instead of raising."""
    from offset_cir.data.common import ImageDataset
    from offset_cir.search.gallery import encode_gallery

    for mod in _search_modules():
        own = [c for c in vars(mod).values() if isinstance(c, type) and c.__module__ == mod.__name__
               and "__getitem__" in vars(c)]
        assert not own, f"{mod.__name__} defines item access of its own: {own}"

    good, broken = tmp_path / "good.png", tmp_path / "broken.png"
    Image.new("RGB", (24, 24), (255, 0, 0)).save(good)
    Image.new("L", (24, 24), 255).save(tmp_path / "good-segmask.png")
    Image.new("L", (24, 24), 255).save(tmp_path / "broken-segmask.png")
    broken.write_bytes(b"not an image")
    model = PixelModel()
    ds = ImageDataset(["good", "broken"], lambda i: tmp_path / f"{i}.png", lambda i: tmp_path / f"{i}-segmask.png",
                      model.preprocess, use_masks=True, report_unreadable=True)
    assert set(ds[0]) == {"image", "mask", "index"} and ds[1]["index"] == 1 and "broken.png" in ds[1]["error"]

    items = [{"id": n, "path": str(tmp_path / f"{n}.png"), "mask": str(tmp_path / f"{n}-segmask.png")}
             for n in ("good", "broken")]
    feats, rows, errors = encode_gallery(model, items, batch_size=2, device="cpu", dtype="float32")
    assert rows == [0] and list(errors) == [1] and "broken.png" in errors[1]
    img = model.preprocess.image(Image.open(good))[None]
    mask = model.preprocess.mask(Image.open(tmp_path / "good-segmask.png"))[None]
    np.testing.assert_allclose(feats[0], model.encode_target(img, mask)[0].detach().numpy(), atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_distributed_module_closes_only_its_own_group(monkeypatch):
    import torch.distributed as dist

    from offset_cir import distributed as D

    assert importlib.util.find_spec("offset_cir.train.distributed") is None  # moved, not copied
    single = D.init_distributed("cpu")  # WORLD_SIZE unset: one process, no group
    assert not single.joined and D.all_ok(True, single) and not D.all_ok(False, single)
    assert D.any_rank(True, single) and not D.any_rank(False, single)

    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0", "GLOO_SOCKET_IFNAME": "lo"}.items():
        monkeypatch.setenv(k, v)
    info = D.init_distributed("cpu", enabled=True, timeout=None)  # a group of one, asked for explicitly
    try:
        assert info.owned and info.joined and dist.is_initialized() and (info.rank, info.world_size) == (0, 1)
        assert D.all_ok(True, info) and not D.all_ok(False, info)
        joined = D.init_distributed("cpu", enabled=True)  # the group exists: joined, not owned
        assert joined.joined and not joined.owned
        D.close_distributed(joined)
        assert dist.is_initialized()  # not destroyed by a process that did not create it
    finally:
        D.close_distributed(info)
    assert not dist.is_initialized()


def _calls_print(path: Path) -> list[int]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [n.lineno for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"]


def test_library_search_code_logs_instead_of_printing():
    for path in _search_files():
        assert not _calls_print(path), f"{path.name} prints (lines {_calls_print(path)}); use logging"


@pytest.mark.parametrize("name", [p.relative_to(SEARCH_DIR).with_suffix("").as_posix() for p in _search_files()])
def test_index_modules_hold_one_job_each(name):
    """Every module of search/ (the service's too) is under 500 lines, each function under 80, and the first line
    of its docstring names its job."""
    path = SEARCH_DIR / f"{name}.py"
    text = path.read_text(encoding="utf-8")
    lines = text.count("\n")
    assert lines <= MAX_MODULE_LINES, f"{path.name} has {lines} lines"
    tree = ast.parse(text)
    sizes = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree)
             if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    long = [(name, size) for name, size in sizes if size > MAX_FUNCTION_LINES]
    assert long == [], f"{path.name}: functions over {MAX_FUNCTION_LINES} lines: {long}"
    doc = ast.get_docstring(tree)
    assert doc and doc.splitlines()[0].strip(), f"{path.name}: the first docstring line names its job"


def test_no_import_circle_in_search():
    """No module of offset_cir.search imports, directly or through others, a module that imports it back."""
    import grimp

    graph = grimp.build_graph("offset_cir", cache_dir=None)
    modules = sorted(m for m in graph.modules if m.startswith("offset_cir.search"))
    circles = []
    for m in modules:
        for dep in sorted(graph.find_modules_directly_imported_by(m)):
            if dep.startswith("offset_cir.") and graph.chain_exists(importer=dep, imported=m):
                chain = graph.find_shortest_chain(importer=dep, imported=m) or (dep, m)
                circles.append(" -> ".join([*chain, dep]))
    assert circles == [], "\n".join(circles)


#: the names the code gives objects of the search modules (an opened index, the format module, ...)
HOLDERS = {"index": "offset_cir.search.index", "idx": "offset_cir.search.index", "fmt": "offset_cir.search.format",
           "ann": "offset_cir.search.ann", "svc": "offset_cir.search.service.state"}


def _private_uses(path: Path, module_prefix: str):
    """``_names`` of modules under ``module_prefix`` that the file at ``path`` imports or reaches into (as
    ``module._name``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(module_prefix):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    yield f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                and isinstance(node.value, ast.Name) and node.value.id in HOLDERS:
            yield f"{HOLDERS[node.value.id]}.{node.attr}"


def test_no_caller_touches_a_private_name_of_another_search_module():
    """The service asks the index through its public methods; nothing outside a module imports its _names."""
    found = []
    for path in [*_search_files(), *(ROOT / "offset_cir" / "commands").glob("*.py"), ROOT / "offset_cir" / "demo.py",
                 *(ROOT / "benchmarks").glob("*.py")]:
        own = path.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".")
        found += [f"{path.relative_to(ROOT)}: {u}" for u in _private_uses(path, "offset_cir.search")
                  if not u.startswith(own + ".")]
    assert found == []


def test_importing_the_index_modules_does_no_cli_import():
    import subprocess

    code = ("import sys, offset_cir.search.index, offset_cir.search.build; "
            "print(sorted(m for m in sys.modules if m.startswith(('offset_cir.commands', 'offset_cir.cli'))), "
            "'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["[]", "False"], out.stdout + out.stderr
