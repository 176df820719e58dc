"""``offset_cir.evaluate`` through the real path with oracle encoders (docs/model.md#evaluation)."""
from __future__ import annotations

import json
import shutil

import pytest

from offset_cir.data import get_dataset
from offset_cir.testing.placeholders import write_benchmark_placeholders
from offset_cir.errors import DatasetError, UserInputError
from offset_cir.eval.evaluate import evaluate
from offset_cir.testing.oracle import OracleModel


def oracle_for(bench, split, codes, sign=1.0, signs=None, random_dim=None):
    targets = [codes[q.target] for q in bench.queries(split)]
    return OracleModel(targets, max(codes.values()) + 1, sign=sign, signs=signs, random_dim=random_dim)


@pytest.fixture
def cirr(shared_data, tmp_path):
    for sub in ("captions", "image_splits"):
        shutil.copytree(shared_data / "cirr" / sub, tmp_path / "cirr" / sub)
    bench = get_dataset("cirr", tmp_path)
    return bench, write_benchmark_placeholders(bench, "val")


def test_cirr_val_oracle_and_reversed(cirr, tmp_path):
    bench, codes = cirr
    assert len(codes) == 2297
    model = oracle_for(bench, "val", codes, random_dim=64)
    model.train()
    res = evaluate(model, bench, "cirr", batch_size=256, progress=False, save_rankings=tmp_path / "rk.jsonl")
    assert model.training  # mode restored
    assert model.references == [codes[q.reference] for q in bench.queries("val")]  # right reference per query
    m = res["metrics"]
    for k in ("R@1", "R@5", "R@10", "R@50", "R_subset@1", "R_subset@2", "R_subset@3", "(R@5+R_subset@1)/2"):
        assert m[k] == 100.0, k
    assert res["selection_score"] == 700.0
    assert (res["protocol"], res["dataset"], res["split"]) == ("cirr-val", "cirr", "val")
    assert res["num_queries"] == {"all": 4181} and res["gallery_size"] == {"all": {"all": 2297}}
    assert res["model"]["backbone"] == "oracle" and res["model"]["config"] == {"backbone": "oracle", "sign": 1.0}
    assert res["model"]["needs_masks"] is True
    assert "torch" in res["versions"] and res["timestamp"].endswith("+00:00")
    json.dumps(res)
    rows = [json.loads(line) for line in open(tmp_path / "rk.jsonl")]
    assert len(rows) == 4181 and all(len(r["top"]) == 50 for r in rows)
    assert all(r["top"][0] == r["target"] and r["reference"] not in r["top"] for r in rows)

    rev = evaluate(oracle_for(bench, "val", codes, sign=-1.0, random_dim=64), bench, "cirr-val", batch_size=512,
                   progress=False)
    assert all(v == 0.0 for v in rev["metrics"].values())


def test_cirr_test_split_is_not_scored(shared_data):
    bench = get_dataset("cirr", shared_data / "cirr")
    with pytest.raises(UserInputError, match="test1 has no targets.*offset submit cirr"):
        evaluate(OracleModel([], 2), bench, "cirr", split="test1", progress=False)
    with pytest.raises(UserInputError, match="protocol shoes is for shoes, not cirr"):
        evaluate(OracleModel([], 2), bench, "shoes", progress=False)
    with pytest.raises(UserInputError, match="unknown protocol"):
        evaluate(OracleModel([], 2), bench, "imagenet", progress=False)


def test_shoes_oracle_and_reversed(shared_data, tmp_path):
    bench = get_dataset("shoes", tmp_path, annotations=shared_data / "shoes",
                        correction_dicts=shared_data / "correction_dicts", use_masks=False)
    codes = write_benchmark_placeholders(bench, "eval", masks=False)
    assert len(codes) == 4658
    queries = bench.queries("eval")
    # even queries: perfect oracle; odd queries: reversed (the target is the farthest of 4,657 candidates)
    signs = [1.0 if i % 2 == 0 else -1.0 for i in range(len(queries))]
    model = oracle_for(bench, "eval", codes, signs=signs, random_dim=64)
    model.uses_masks = False
    res = evaluate(model, bench, batch_size=512, progress=False)
    # a forward query is a hit unless its target is its own (excluded) reference: one such triplet in eval
    hits = sum(1 for i, q in enumerate(queries) if i % 2 == 0 and q.target != q.reference)
    assert hits in (880, 881)
    assert res["protocol"] == "shoes" and res["num_queries"] == {"all": 1761}
    assert res["gallery_size"] == {"all": {"all": 4658}}
    for k in ("R@1", "R@10", "R@50", "mean"):
        assert res["metrics"][k] == pytest.approx(100.0 * hits / 1761)
    assert res["selection_score"] == pytest.approx(200.0 * hits / 1761)
    assert res["notes"]["queries_with_target_equal_reference"] == 1
    assert res["model"]["needs_masks"] is False


def _mini_fashioniq(root):
    (root / "captions").mkdir()
    (root / "image_splits").mkdir()
    for cat in ("dress", "shirt", "toptee"):
        names = [f"{cat[0]}{i:02d}" for i in range(60)]
        (root / f"image_splits/split.{cat}.val.json").write_text(json.dumps(names))
        recs = [{"candidate": names[0], "target": names[1], "captions": ["Is Red", "longer"]},
                {"candidate": names[2], "target": names[3], "captions": ["", "Blue!"]}]
        (root / f"captions/cap.{cat}.val.json").write_text(json.dumps(recs))


def test_fashioniq_union_and_full_by_hand(tmp_path):
    _mini_fashioniq(tmp_path)
    bench = get_dataset("fashioniq", tmp_path, correction_dicts="none")
    assert [q.text for q in bench.queries("val")[:2]] == ["is red and longer", "blue"]
    codes = write_benchmark_placeholders(bench, "val")
    # the second dress query is reversed: its target is last of the 59 full-gallery candidates (miss at 10 and 50)
    # but third of the 3 union candidates (k larger than the union gallery: a hit)
    signs = [1.0, -1.0, 1.0, 1.0, 1.0, 1.0]
    res = evaluate(oracle_for(bench, "val", codes, signs=signs), bench, "fashioniq", batch_size=4, progress=False)
    m = res["metrics"]
    assert res["gallery"] == ["union", "full"]
    assert res["gallery_size"] == {"union": {"dress": 4, "shirt": 4, "toptee": 4},
                                   "full": {"dress": 60, "shirt": 60, "toptee": 60}}
    assert m["union/dress/R@10"] == 100.0 and m["union/avg/R@50"] == 100.0 and m["union/avg"] == 100.0
    assert m["full/dress/R@10"] == 50.0 and m["full/dress/R@50"] == 50.0
    assert m["full/shirt/R@10"] == 100.0 and m["full/toptee/R@50"] == 100.0
    assert m["full/avg/R@10"] == pytest.approx(250 / 3) and m["full/avg"] == pytest.approx(250 / 3)
    assert res["selection_score"] == 300.0  # sum of union R@10
    one = evaluate(oracle_for(bench, "val", codes, signs=signs), bench, "fashioniq-full", batch_size=4, progress=False)
    assert one["gallery"] == ["full"] and one["metrics"]["full/avg/R@10"] == pytest.approx(250 / 3)
    assert not any(k.startswith("union/") for k in one["metrics"])


def test_fashion200k_description_hits(tmp_path):
    (tmp_path / "labels").mkdir()
    rows = ["women/t/10.jpeg\t0.9\twhite cotton top", "women/t/11.jpeg\t0.9\tblack cotton top",
            "women/t/12.jpeg\t0.9\tblack cotton top", "women/t/13.jpeg\t0.9\tstriped silk shirt"]
    (tmp_path / "labels/top_test_detect_all.txt").write_text("\n".join(rows) + "\n")
    bench = get_dataset("fashion200k", tmp_path)
    codes = write_benchmark_placeholders(bench, "test")
    qs = bench.queries("test")
    assert [q.reference[-7:] for q in qs] == ["10.jpeg", "11.jpeg", "12.jpeg"]
    res = evaluate(oracle_for(bench, "test", codes), bench, progress=False)
    assert res["protocol"] == "fashion200k-tirg" and res["metrics"]["R@1"] == 100.0
    # reversed: query 10's target gets the lowest score, but the other "black cotton top" image ranks first
    # (a hit at 1: hits are by description); queries 11 and 12 want image 10, ranked last of 3 candidates
    rev = evaluate(oracle_for(bench, "test", codes, sign=-1.0), bench, progress=False)
    assert rev["metrics"]["R@1"] == pytest.approx(100 / 3)
    assert rev["metrics"]["R@10"] == rev["metrics"]["R@50"] == 100.0
    assert "generated" in rev["notes"]["test_queries"]


def test_synthetic_unseen_metrics(tmp_path):
    synthetic = pytest.importorskip("offset_cir.data.synthetic")
    synthetic.generate(tmp_path / "syn", n_train=3, n_val=3, n_test=8, image_size=32, progress=False)
    bench = get_dataset("synthetic", tmp_path / "syn")
    codes = write_benchmark_placeholders(bench, "test")  # placeholders over the rendered images
    unseen = bench.unseen_pairids("test")
    assert 0 < len(unseen) < 8
    signs = [-1.0 if q.pairid in unseen else 1.0 for q in bench.queries("test")]
    res = evaluate(oracle_for(bench, "test", codes, signs=signs), bench, progress=False)
    m, n_seen = res["metrics"], 8 - len(unseen)
    assert res["protocol"] == "synthetic" and res["split"] == "test" and res["num_queries"]["unseen"] == len(unseen)
    assert m["R@1"] == pytest.approx(100 * n_seen / 8) and m["R_subset@3"] == pytest.approx(100 * n_seen / 8)
    assert m["unseen_R@1"] == m["unseen_R@10"] == m["unseen_R_subset@3"] == 0.0
    assert m["unseen_R@50"] == 100.0  # 47 candidates: k larger than the gallery


def test_cli_eval(tmp_path, monkeypatch, capsys):
    import offset_cir
    from offset_cir.cli import main

    _mini_fashioniq(tmp_path)
    bench = get_dataset("fashioniq", tmp_path, correction_dicts="none")
    codes = write_benchmark_placeholders(bench, "val")
    model = oracle_for(bench, "val", codes)
    monkeypatch.setattr(offset_cir, "load_checkpoint", lambda path: model, raising=False)
    out = tmp_path / "res.json"
    rc = main(["eval", "--dataset", "fashioniq", "--root", str(tmp_path), "--checkpoint", "m.safetensors",
               "--protocol", "fashioniq-union", "--set", "correction_dicts=none", "--num-workers", "0",
               "--device", "cpu", "--out", str(out), "--rankings", str(tmp_path / "rk.jsonl")])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["metrics"]["union/avg/R@10"] == 100.0 and res["checkpoint"] == "m.safetensors"
    assert "union/dress/R@10" in capsys.readouterr().out
    rows = [json.loads(line) for line in open(tmp_path / "rk.jsonl")]
    assert len(rows) == 6 and all(len(r["top"]) == 3 for r in rows)  # union of 4 minus the reference
    assert main(["eval", "--dataset", "fashioniq", "--root", str(tmp_path), "--checkpoint", "m",
                 "--protocol", "cirr-val"]) == 2
    assert "protocol cirr-val is for cirr or synthetic, not fashioniq" in capsys.readouterr().err


@pytest.mark.slow
def test_fashioniq_real_val_full_galleries(shared_data, tmp_path):
    """All 15,536 val gallery images of the three categories as placeholders: oracle 100 on both galleries."""
    bench = get_dataset("fashioniq", tmp_path, annotations=shared_data / "fashioniq", use_masks=False,
                        correction_dicts=shared_data / "correction_dicts")
    codes = write_benchmark_placeholders(bench, "val", masks=False)
    assert len(codes) == 3817 + 6346 + 5373
    model = oracle_for(bench, "val", codes, random_dim=64)
    model.uses_masks = False
    res = evaluate(model, bench, "fashioniq", batch_size=512, progress=False)
    assert res["num_queries"] == {"dress": 2017, "shirt": 2038, "toptee": 1961}
    assert res["gallery_size"]["union"] == {"dress": 2628, "shirt": 3089, "toptee": 2902}
    assert all(v == 100.0 for v in res["metrics"].values())


def test_query_transform_a2(tmp_path):
    """docs/model.md#a2: FashionIQ queries use the training transform by default (release); galleries never do."""
    from offset_cir.testing.placeholders import CodePreprocess

    class Recording(CodePreprocess):
        def __init__(self):
            self.calls = []

        def pair(self, img, mask, train=False):
            self.calls.append(bool(train))
            return super().pair(img, mask, train)

    _mini_fashioniq(tmp_path)
    bench = get_dataset("fashioniq", tmp_path, correction_dicts="none")
    codes = write_benchmark_placeholders(bench, "val")
    for choice, want in ((None, True), ("eval", False)):
        model = oracle_for(bench, "val", codes)
        model.preprocess = Recording()
        res = evaluate(model, bench, "fashioniq-union", query_transform=choice, progress=False)
        assert res["query_transform"] == ("train" if want else "eval")
        # per category: 4 gallery images (eval transform), then 2 queries
        assert model.preprocess.calls == ([False] * 4 + [want] * 2) * 3
    with pytest.raises(UserInputError, match="query_transform must be"):
        evaluate(model, bench, "fashioniq", query_transform="random", progress=False)


def test_no_grad_eval_mode_and_public_name(tmp_path):
    import torch

    import offset_cir

    assert offset_cir.evaluate is evaluate
    seen = []

    class Checking(OracleModel):
        def encode_target(self, images, masks=None):
            seen.append((torch.is_grad_enabled(), self.training))
            return super().encode_target(images, masks)

        def encode_query(self, images, masks, texts):
            seen.append((torch.is_grad_enabled(), self.training))
            return super().encode_query(images, masks, texts)

    _mini_fashioniq(tmp_path)
    bench = get_dataset("fashioniq", tmp_path, correction_dicts="none")
    codes = write_benchmark_placeholders(bench, "val")
    model = Checking([codes[q.target] for q in bench.queries("val")], max(codes.values()) + 1)
    model.train()
    evaluate(model, bench, "fashioniq", batch_size=8, progress=False)
    assert seen and set(seen) == {(False, False)} and model.training


def test_non_finite_features_are_refused(tmp_path):
    # NaN scores compare false with everything: ranked naively, every target would come first (R@K = 100).
    _mini_fashioniq(tmp_path)
    bench = get_dataset("fashioniq", tmp_path, correction_dicts="none")
    codes = write_benchmark_placeholders(bench, "val")
    model = oracle_for(bench, "val", codes)
    real = model.encode_target

    def nan_target(images, masks=None):
        out = real(images, masks).clone()
        out[0] = float("nan")
        return out

    model.encode_target = nan_target
    with pytest.raises(UserInputError, match="non-finite values"):
        evaluate(model, bench, "fashioniq", batch_size=4, progress=False)


class _PixelModel:
    """A deterministic double whose features are a fixed random projection of the preprocessed pixels, so a
    query's feature changes with its random crop (the real ``Preprocess``: RandomResizedCrop in training)."""

    def __init__(self, size=16, dim=16):
        import torch

        from offset_cir.model.preprocess import Preprocess

        self.uses_masks = True
        self.preprocess = Preprocess(size)
        self.w = torch.randn(dim, 3 * size * size, generator=torch.Generator().manual_seed(0))

    def _feat(self, images):
        return images.flatten(1) @ self.w.T

    def encode_target(self, images, masks=None):
        import torch.nn.functional as F

        return F.normalize(self._feat(images) + 0.1 * self._feat(masks), dim=-1)

    def encode_query(self, images, masks, texts):
        import torch.nn.functional as F

        return F.normalize(self._feat(images) + 0.1 * self._feat(masks), dim=-1)


def _fashioniq_many_queries(root, n_images=30, n_queries=12):
    (root / "captions").mkdir(parents=True)
    (root / "image_splits").mkdir()
    for cat in ("dress", "shirt", "toptee"):
        names = [f"{cat[0]}{i:02d}" for i in range(n_images)]
        (root / f"image_splits/split.{cat}.val.json").write_text(json.dumps(names))
        recs = [{"candidate": names[i], "target": names[(7 * i + 3) % n_images], "captions": [f"cap {i}", "x"]}
                for i in range(n_queries)]
        (root / f"captions/cap.{cat}.val.json").write_text(json.dumps(recs))


def test_fashioniq_train_transform_queries_do_not_depend_on_workers(tmp_path):
    # docs/model.md#a2: FashionIQ queries go through the random training crop. Each query's crop is seeded by its own
    # (unit, index), so the same model scores the same for 0, 1 and 2 DataLoader workers and any batch size.
    import torch

    import numpy as np
    from PIL import Image

    _fashioniq_many_queries(tmp_path / "fiq")
    bench = get_dataset("fashioniq", tmp_path / "fiq", correction_dicts="none")
    rng = np.random.default_rng(0)
    for image_id in bench.split_images("val"):  # 32 px noise images: a 0.9-1.0 crop really moves the pixels
        for path, mode in ((bench.image_path(image_id), "RGB"), (bench.mask_path(image_id), "L")):
            path.parent.mkdir(parents=True, exist_ok=True)
            shape = (32, 32, 3) if mode == "RGB" else (32, 32)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    model = _PixelModel()
    runs = {}
    for workers, batch in ((0, 4), (1, 4), (2, 4), (0, 5)):
        torch.manual_seed(1000 + workers)  # the caller's RNG state must not matter either
        runs[workers, batch] = evaluate(model, bench, "fashioniq", batch_size=batch, num_workers=workers,
                                        progress=False, save_rankings=tmp_path / f"rank-{workers}-{batch}.jsonl")
    rankings = {key: (tmp_path / f"rank-{key[0]}-{key[1]}.jsonl").read_text() for key in runs}
    first = runs[0, 4]
    for key, res in runs.items():
        assert res["metrics"] == first["metrics"], key
        assert rankings[key] == rankings[0, 4], key
    # the crop does reach the features: the evaluation transform ranks differently
    plain = evaluate(model, bench, "fashioniq", batch_size=4, query_transform="eval", progress=False,
                     save_rankings=tmp_path / "rank-eval.jsonl")
    assert plain["query_transform"] == "eval"
    assert (tmp_path / "rank-eval.jsonl").read_text() != rankings[0, 4]


def test_several_units_keep_their_own_metrics(tmp_path):
    # A benchmark whose split has two evaluation units under a protocol that is not per unit (Shoes' metrics):
    # each unit's metrics stay under its own name and the headline is their mean; neither replaces the other.
    from offset_cir.data.common import Benchmark, EvalSet, Query

    class TwoUnits(Benchmark):
        name = "shoes"
        default_protocol = "shoes"

        def splits(self):
            return ["eval"]

        def image_path(self, image_id):
            return tmp_path / "img" / f"{image_id}.png"

        def mask_path(self, image_id):
            return tmp_path / "img" / f"{image_id}-mask.png"

        def eval_sets(self, split):
            sets = []
            for unit in ("a", "b"):
                ids = [f"{unit}{i}" for i in range(12)]
                queries = [Query(i, ids[i], f"text {i}", ids[i + 6]) for i in range(6)]
                sets.append(EvalSet(unit, queries, {"all": ids}))
            return sets

        def _queries(self, split):
            return [q for es in self.eval_sets(split) for q in es.queries]

    bench = TwoUnits(tmp_path)
    codes = write_benchmark_placeholders(bench, "eval")
    targets = [codes[q.target] for es in bench.eval_sets("eval") for q in es.queries]
    # unit a: the oracle finds every target; unit b: reversed, every target ranks last of 11 candidates
    model = OracleModel(targets, max(codes.values()) + 1, signs=[1.0] * 6 + [-1.0] * 6)
    res = evaluate(model, bench, "shoes", batch_size=4, progress=False)
    m = res["metrics"]
    assert (m["a/R@1"], m["a/R@10"], m["a/R@50"]) == (100.0, 100.0, 100.0)
    assert (m["b/R@1"], m["b/R@10"], m["b/R@50"]) == (0.0, 0.0, 100.0)
    assert (m["R@1"], m["R@10"], m["R@50"]) == (50.0, 50.0, 100.0)
    assert m["mean"] == pytest.approx(200 / 3)
    assert res["num_queries"] == {"a": 6, "b": 6}


def test_fashioniq_repeated_category_is_one_unit(tmp_path):
    _mini_fashioniq(tmp_path)
    bench = get_dataset("fashioniq", tmp_path, correction_dicts="none", categories="dress,dress")
    assert [es.name for es in bench.eval_sets("val")] == ["dress"]


def test_evaluation_opens_datasets_through_the_mask_check(tmp_path):
    # A copy set up with use_masks=False must not feed masks to a model that uses them, even when mask files
    # happen to lie there: evaluation opens its Datasets by the benchmark's one route, which checks.
    _mini_fashioniq(tmp_path)
    bench = get_dataset("fashioniq", tmp_path, correction_dicts="none", use_masks=False)
    codes = write_benchmark_placeholders(bench, "val")  # images and masks on disk
    with pytest.raises(DatasetError, match="use_masks=False but the model needs masks"):
        evaluate(oracle_for(bench, "val", codes), bench, "fashioniq", batch_size=4, progress=False)
    model = oracle_for(bench, "val", codes)
    model.uses_masks = False  # a model without masks: no mask is asked for, the copy's setting is respected
    assert evaluate(model, bench, "fashioniq", batch_size=4, progress=False)["metrics"]["union/avg"] == 100.0


def test_device_follows_the_one_device_rule(tmp_path):
    import torch

    _mini_fashioniq(tmp_path)
    bench = get_dataset("fashioniq", tmp_path, correction_dicts="none")
    codes = write_benchmark_placeholders(bench, "val")
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(UserInputError, match="CUDA is not available"):
        evaluate(oracle_for(bench, "val", codes), bench, "fashioniq", batch_size=4, progress=False, device="cuda")
