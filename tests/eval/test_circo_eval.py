"""Protocol ``circo-val`` end to end, checked against an independent computation, and the test-server file."""
from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch

from offset_cir.data import get_dataset
from offset_cir.eval.evaluate import evaluate
from offset_cir.testing.oracle import HashModel


def _independent(bench, codes, model, exclude_reference: bool):
    """Top-50 lists, mAP@K, R@K and per-aspect mAP@10 recomputed with numpy from the model's feature table, in the
    manner of the benchmark's own evaluation script (np.isin, cumulative sums)."""
    table = model.table.double().numpy()
    gallery = bench.gallery()
    g = table[[codes[i] for i in gallery]]
    queries = bench.queries("val")
    n = table.shape[0]
    q = np.stack([table[codes[x.reference]] + table[zlib.crc32(x.text.encode()) % n] for x in queries])
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    scores = q @ g.T
    if exclude_reference:
        for i, x in enumerate(queries):
            scores[i, gallery.index(x.reference)] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :50]
    lists = [[gallery[j] for j in row] for row in order]
    out, per_aspect = {}, {}
    aps = {k: [] for k in (5, 10, 25, 50)}
    for x, top in zip(queries, lists):
        labels = np.isin(np.array(top), np.array(x.ground_truths))
        precisions = np.cumsum(labels) * labels / np.arange(1, 51)
        for k in aps:
            aps[k].append(precisions[:k].sum() / min(k, len(x.ground_truths)))
        for a in x.aspects:
            per_aspect.setdefault(a, []).append(precisions[:10].sum() / min(10, len(x.ground_truths)))
    for k in aps:
        out[f"mAP@{k}"] = 100 * np.mean(aps[k])
        out[f"R@{k}"] = 100 * np.mean([x.target in top[:k] for x, top in zip(queries, lists)])
    out.update({f"mAP@10/{a}": 100 * np.mean(v) for a, v in per_aspect.items()})
    return out, lists, scores


@pytest.mark.parametrize("protocol", ["circo-val", "circo-val-noref"])
def test_circo_val_equals_an_independent_computation(circo_copy, tmp_path, protocol):
    root, codes = circo_copy
    bench = get_dataset("circo", root)
    model = HashModel(dim=32, max_code=max(codes.values()))  # a query is its reference's feature plus a text's
    res = evaluate(model, bench, protocol, batch_size=64, progress=False, save_rankings=tmp_path / "rk.jsonl")
    noref = protocol == "circo-val-noref"
    want, lists, scores = _independent(bench, codes, model, exclude_reference=noref)
    assert res["protocol"] == protocol and res["reference_excluded"] is noref
    assert res["num_queries"] == {"all": 220} and res["gallery_size"] == {"all": {"all": len(codes)}}
    assert set(res["metrics"]) == set(want)
    for key, value in want.items():
        assert res["metrics"][key] == pytest.approx(value, abs=1e-9), key
    assert len([k for k in want if k.startswith("mAP@10/")]) == 9  # the nine semantic aspects of CIRCO val
    assert res["selection_score"] == pytest.approx(sum(want[f"mAP@{k}"] for k in (5, 10, 25, 50)))
    rows = [json.loads(line) for line in open(tmp_path / "rk.jsonl")]
    column = {x: j for j, x in enumerate(bench.gallery())}
    for i, (row, theirs) in enumerate(zip(rows, lists)):  # the same lists, up to float32 rounding between near ties
        mine = [scores[i, column[x]] for x in row["top"]]
        assert np.allclose(mine, [scores[i, column[x]] for x in theirs], atol=1e-6, rtol=0)
    refs_listed = sum(r["reference"] in r["top"] for r in rows)
    assert refs_listed == 0 if noref else refs_listed > 0  # the reference is its own nearest image


def test_the_whole_gallery_is_ranked_and_the_text_alone_finds_nothing_special(circo_copy):
    """A model whose query is its target's own feature scores 100 on every metric with one ground truth each; with
    several ground truths mAP@K counts the others: AP@5 = 1/min(5, n) when only the target is first."""
    from offset_cir.testing.oracle import OracleModel

    root, codes = circo_copy
    bench = get_dataset("circo", root)
    queries = bench.queries("val")
    oracle = OracleModel([codes[q.target] for q in queries], max(codes.values()) + 1, random_dim=64)
    m = evaluate(oracle, bench, "circo-val", batch_size=256, progress=False)["metrics"]
    assert all(m[f"R@{k}"] == 100.0 for k in (5, 10, 25, 50))
    # only the target is found: AP@5 = (1/1) / min(5, n) per query (the random features rank the others anywhere,
    # so a second ground truth in the top 5 would only raise it)
    floor = 100 * np.mean([1 / min(5, len(q.ground_truths)) for q in queries])
    assert floor <= m["mAP@5"] < 100.0


def test_the_test_split_is_scored_by_the_server(circo_copy, tmp_path, capsys):
    from offset_cir.errors import UserInputError
    from offset_cir.eval.circo_submission import predict_test, validate_submission, write_submission

    root, codes = circo_copy
    bench = get_dataset("circo", root)
    with pytest.raises(UserInputError, match="test has no targets.*offset submit circo"):
        evaluate(HashModel(dim=8, max_code=max(codes.values())), bench, "circo-val", split="test", progress=False)
    model = HashModel(dim=16, max_code=max(codes.values()))
    preds = predict_test(model, bench, batch_size=128, progress=False)
    assert list(preds) == [str(i) for i in range(800)]
    assert all(len(v) == 50 == len(set(v)) and all(type(x) is int for x in v) for v in preds.values())
    path = write_submission(preds, tmp_path / "out")
    assert validate_submission(path, bench, check_gallery=True) == []
    # the same ranking as the evaluation path gives: the first query's list, by the model's own features
    table = model.table
    q0 = bench.queries("test")[0]
    n = table.shape[0]
    query = torch.nn.functional.normalize(table[codes[q0.reference]] + table[zlib.crc32(q0.text.encode()) % n], dim=0)
    gallery = bench.gallery()
    scores = torch.stack([table[codes[i]] for i in gallery]) @ query
    assert preds["0"] == [int(gallery[j]) for j in torch.sort(scores, descending=True, stable=True).indices[:50]]
    # excluding the reference is an option of the writer too
    noref = predict_test(model, bench, batch_size=128, progress=False, exclude_reference=True)
    assert all(int(q.reference) not in noref[str(q.pairid)] for q in bench.queries("test"))
