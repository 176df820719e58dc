"""Caption normalisation (docs/model.md#data), collate, image/mask loading errors, get_dataset."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from offset_cir.data import collate, get_dataset
from offset_cir.data.common import join_captions, load_correction_dict, normalize_caption, open_image
from offset_cir.data.fashioniq import FashionIQ
from offset_cir.errors import DatasetError, UserInputError


def test_normalize_by_hand():
    assert normalize_caption("Is Shiny, and SILVER!!") == "is shiny and silver"
    assert normalize_caption("  v-neck   (long)sleeves. ") == "v neck long sleeves"
    # a correction can expand to two words; spaces stay single
    assert normalize_caption("Has a VNECK, sleevs", {"vneck": "v neck", "sleevs": "sleeves"}) == "has a v neck sleeves"
    # corrections apply to whole tokens only
    assert normalize_caption("vnecks", {"vneck": "v neck"}) == "vnecks"
    assert normalize_caption("") == ""
    assert normalize_caption(" ?!. ") == ""
    # non-ASCII punctuation is not in string.punctuation and stays
    assert normalize_caption("café—style") == "café—style"


def test_join_empty_captions_defined():
    assert join_captions(["is red", "shorter"]) == "is red and shorter"
    assert join_captions(["", "shorter"]) == "shorter"
    assert join_captions(["is red", ""]) == "is red"
    assert join_captions(["", ""]) == ""


def test_real_corrections(shared_data):
    fix = load_correction_dict(shared_data / "correction_dicts" / "correction_dict_dress.json")
    assert fix["sleevs"] == "sleeves" and fix["vneck"] == "v neck"
    bench = FashionIQ(shared_data / "fashioniq", categories="dress", correction_dicts=shared_data / "correction_dicts")
    raw = json.loads((shared_data / "fashioniq/captions/cap.dress.val.json").read_text())
    texts = [q.text for q in bench.queries("val")]
    i = next(i for i, r in enumerate(raw) if "thicker sleevs" in r["captions"][0] + r["captions"][1])
    assert "thicker sleeves" in texts[i] and "sleevs" not in texts[i].split()
    j = next(i for i, r in enumerate(raw) if "has a vneck with long sleeves" in r["captions"][0] + r["captions"][1])
    assert "has a v neck with long sleeves" in texts[j]
    # the shoes dictionary through the Shoes loader: "have backstraps" -> "have backstrap"
    shoes = get_dataset("shoes", shared_data / "shoes", correction_dicts=shared_data / "correction_dicts")
    all_q = shoes.queries("train") + shoes.queries("eval")
    assert any(q.reference == "img_womens_clogs_1210.jpg" and q.text == "have backstrap" for q in all_q)


def test_sixteen_empty_fashioniq_captions(shared_data):
    bench = FashionIQ(shared_data / "fashioniq", correction_dicts=shared_data / "correction_dicts")
    n_empty, checked = 0, 0
    for split in ("train", "val", "test"):
        texts = {}
        for cat in ("dress", "shirt", "toptee"):
            raw = json.loads((shared_data / f"fashioniq/captions/cap.{cat}.{split}.json").read_text())
            fix = load_correction_dict(shared_data / f"correction_dicts/correction_dict_{cat}.json")
            texts[cat] = [(r["captions"], fix) for r in raw]
        queries = bench.queries(split)
        flat = [t for cat in ("dress", "shirt", "toptee") for t in texts[cat]]
        assert len(flat) == len(queries)
        for (caps, fix), q in zip(flat, queries):
            empties = [c for c in caps if c == ""]
            n_empty += len(empties)
            if empties:
                others = [normalize_caption(c, fix) for c in caps if c != ""]
                assert q.text == " and ".join(o for o in others if o)
                checked += 1
    assert n_empty == 16 and checked >= 8


def test_collate_keeps_texts_and_no_masks_as_none():
    items = [{"ref_image": torch.ones(3, 2, 2) * i, "ref_mask": None, "text": f"t{i}",
              "tgt_image": torch.ones(3, 2, 2), "tgt_mask": None, "index": i} for i in range(3)]
    batch = collate(items)
    assert batch["text"] == ["t0", "t1", "t2"]
    assert batch["ref_image"].shape == (3, 3, 2, 2) and batch["ref_image"][2, 0, 0, 0] == 2
    assert batch["ref_mask"] is None and batch["tgt_mask"] is None  # "no mask" stays None
    assert batch["index"].dtype == torch.long and batch["index"].tolist() == [0, 1, 2]
    items[1]["ref_mask"] = torch.ones(3, 2, 2)
    with pytest.raises(ValueError, match="'ref_mask' is None in 2 of 3 items"):
        collate(items)


def test_datasets_take_their_arguments_in_one_order():
    import inspect

    from offset_cir.data.common import ImageDataset, QueryDataset, TripletDataset

    def params(cls):
        return [(p.name, p.kind) for p in inspect.signature(cls).parameters.values()]

    triplet, query, image = params(TripletDataset), params(QueryDataset), params(ImageDataset)
    assert triplet == query  # same names, same order, same positional/keyword-only split
    shared = [n for n, _ in triplet if n != "train"][1:]  # ImageDataset has no training transform
    assert [n for n, _ in image][1:len(shared) + 1] == shared  # (options of its own may follow)
    assert ("use_masks", inspect.Parameter.KEYWORD_ONLY) in triplet  # two booleans are never swapped by position


def test_open_image_errors(tmp_path):
    with pytest.raises(DatasetError, match="image not found: .*nope.png"):
        open_image(tmp_path / "nope.png")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(DatasetError, match="cannot be read .*bad.jpg"):
        open_image(bad)
    Image.new("RGB", (4, 4), (255, 0, 0)).save(tmp_path / "ok.png")
    assert open_image(tmp_path / "ok.png", "L").mode == "L"


def test_get_dataset_errors(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset 'imagenet'"):
        get_dataset("imagenet", tmp_path)
    with pytest.raises(DatasetError, match="root is not a folder: .*missing"):
        get_dataset("cirr", tmp_path / "missing")
    with pytest.raises(DatasetError, match="bad setting"):
        get_dataset("cirr", tmp_path, colour="red")
    with pytest.raises(DatasetError, match="no captions folder"):
        get_dataset("fashioniq", tmp_path).queries("val")
    with pytest.raises(DatasetError, match="unknown category"):
        get_dataset("fashioniq", tmp_path, categories="hats")
    assert issubclass(DatasetError, UserInputError)


def test_correction_dict_setting(tmp_path, shared_data):
    with pytest.raises(DatasetError, match="correction dictionary not found"):
        FashionIQ(shared_data / "fashioniq", correction_dicts=tmp_path).queries("val")
    none = FashionIQ(shared_data / "fashioniq", categories="dress", correction_dicts="none")
    assert any("sleevs" in q.text.split() for q in none.queries("val"))


def test_mask_of_another_size_names_the_record(tmp_path):
    # Training, query and gallery items refuse a mask whose size is not its image's (200x50 for 64x64), naming the
    # dataset, split, record, the two files and both sizes, instead of stretching the mask silently.
    import re

    from offset_cir.testing.placeholders import write_benchmark_placeholders
    from offset_cir.model.preprocess import Preprocess

    (tmp_path / "captions").mkdir()
    (tmp_path / "image_splits").mkdir()
    names = ["d0", "d1", "d2", "d3"]
    for split in ("train", "val"):
        (tmp_path / f"image_splits/split.dress.{split}.json").write_text(json.dumps(names))
        recs = [{"candidate": "d0", "target": "d1", "captions": ["red", "long"]},
                {"candidate": "d2", "target": "d3", "captions": ["blue", "short"]}]
        (tmp_path / f"captions/cap.dress.{split}.json").write_text(json.dumps(recs))
    bench = FashionIQ(tmp_path, categories="dress", correction_dicts="none")
    write_benchmark_placeholders(bench, "val")
    for image_id in (f"dress/{n}" for n in names):  # 64x64 images and masks
        Image.new("RGB", (64, 64), "white").save(bench.image_path(image_id))
        Image.new("L", (64, 64), 255).save(bench.mask_path(image_id))
    pre = Preprocess(32)
    train = bench.triplets("train", pre, train=True)
    assert train[1]["ref_mask"].shape == (3, 32, 32)  # matching sizes load
    Image.new("L", (200, 50), 255).save(bench.mask_path("dress/d3"))
    with pytest.raises(DatasetError) as err:
        train[1]
    msg = str(err.value)
    assert "fashioniq split train" in msg and "triplet 1 (reference dress/d2, target dress/d3), its target" in msg
    assert "200x50" in msg and "64x64" in msg and str(bench.mask_path("dress/d3")) in msg
    with pytest.raises(DatasetError, match=re.escape("fashioniq split val")):
        bench.gallery_dataset("val", pre)[3]
    query = bench.query_dataset("val", pre)
    query[0]
    Image.new("L", (64, 65), 255).save(bench.mask_path("dress/d2"))
    with pytest.raises(DatasetError, match=re.escape("query 1 (reference dress/d2)") + ".*64x65.*64x64"):
        query[1]


def test_item_seeds_draw_the_stream_of_torch_manual_seed():
    from torch.utils.data import Dataset

    from offset_cir.data.common import ItemSeededDataset

    class Draws(Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return torch.rand(3)

    ds = ItemSeededDataset(Draws(), seed=7, salt="unit")
    torch.manual_seed(123)
    outside = torch.get_rng_state()
    for key, (unit, i) in ((2, (None, 2)), ((1, 4), (1, 4))):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ds.item_seed(i, unit))
            expected = torch.rand(3)
        assert torch.equal(ds[key], expected)
    assert torch.equal(torch.get_rng_state(), outside)  # the caller's stream is untouched
