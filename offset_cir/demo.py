"""The embedded default (``offset demo`` / ``make demo``): on the synthetic cluttered-scene benchmark, train
OFFSET, OFFSET without masks (ablation w/o FM) and a late-fusion baseline (w/o FM + w/o MG-FP + w/o Revision)
for the same number of steps, evaluate them on the test split, and write ``results.json``, ``report.md``,
``curves.png`` and ``retrievals.png``.
"""
from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path

log = logging.getLogger(__name__)

RUNS: dict[str, list[str]] = {
    "offset": [],
    "offset_wo_fm": ["wo_fm"],
    "late_fusion": ["wo_fm", "wo_mgfp", "wo_revision"],
}
LABELS = {"offset": "OFFSET", "offset_wo_fm": "OFFSET w/o FM (no masks)", "late_fusion": "late fusion baseline"}
METRICS = ["R@1", "R@5", "R@10", "R@50", "R_subset@1", "unseen_R@10"]
# Relative cost of a step without masks (2 encoder passes per triplet instead of 4), used to plan the budget.
NO_MASK_STEP_COST = 0.6
TEST_EVAL_RESERVE_S = 75.0


def _train_cfg(name: str, ablations: list[str], data: Path, out: Path, seed: int, overrides: list[str]):
    from offset_cir.train.config import load_config

    extra = [f"model.ablate=[{','.join(ablations)}]"] if ablations else []
    return load_config("synthetic", [
        f"name={name}", f"data.root={data}", f"out_dir={out}", f"seed={seed}", "epochs=1000",
        "early_stop_patience=null", "eval_every_epochs=1", *extra, *overrides])


def _test_metrics(run_dir: Path, bench, rankings: Path | None) -> tuple[dict, dict]:
    from offset_cir.eval.evaluate import evaluate
    from offset_cir.model.checkpoint import load_checkpoint

    ckpt = run_dir / "best" if (run_dir / "best").is_dir() else run_dir / "last"
    model = load_checkpoint(ckpt)
    result = evaluate(model, bench, "synthetic", split="test", batch_size=128, save_rankings=rankings, progress=False)
    return {k: round(result["metrics"][k], 2) for k in METRICS if k in result["metrics"]}, result


def run_demo(out_dir="runs/demo", data_dir="data/synthetic", budget_minutes: float = 12.0, seeds=(0,),
             overrides: list[str] | None = None, progress: bool = True, synth_kwargs: dict | None = None) -> dict:
    """Run the whole demo within ``budget_minutes`` (per seed); returns the results dict also written to disk."""
    from offset_cir.data import get_dataset
    from offset_cir.data.synthetic import generate
    from offset_cir.train.trainer import Trainer

    started = time.monotonic()
    out, data = Path(out_dir), Path(data_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not (data / "synthetic_meta.json").is_file():
        log.info("generating the synthetic benchmark in %s", data)
        generate(data, seed=0, **(synth_kwargs or {}))
    bench = get_dataset("synthetic", data)
    per_seed: dict[int, dict] = {}
    curves: dict[str, dict] = {}
    train_info: dict[str, dict] = {}
    overrides = list(overrides or [])
    for si, seed in enumerate(seeds):
        seed_start = time.monotonic()
        spent = seed_start - started if si == 0 else 0.0
        available = max(budget_minutes * 60 - spent - TEST_EVAL_RESERVE_S, 60.0)
        offset_budget = available / (1 + 2 * NO_MASK_STEP_COST) / 1.1
        per_seed[seed] = {}
        steps = None
        for name, ablations in RUNS.items():
            run_dir = out / f"seed{seed}" / name
            limit = [f"time_budget_minutes={offset_budget / 60:.4f}"] if steps is None else \
                [f"max_steps={steps}", f"time_budget_minutes={offset_budget / 60:.4f}"]
            cfg = _train_cfg(name, ablations, data, run_dir, seed, overrides + limit)
            if run_dir.exists():
                import shutil

                shutil.rmtree(run_dir)
            log.info("seed %d: training %s (%s)", seed, LABELS[name], ", ".join(ablations) or "full model")
            summary = Trainer(cfg, progress=progress).fit()
            if steps is None:
                steps = summary["steps"]  # the others train for as many steps (same triplets seen)
            rankings = out / f"seed{seed}" / "offset_test_rankings.jsonl" if name == "offset" else None
            metrics, result = _test_metrics(run_dir, bench, rankings)
            per_seed[seed][name] = metrics
            train_info.setdefault(name, {})[str(seed)] = {"steps": summary["steps"], "seconds": round(summary["seconds"], 1)}
            if si == 0:
                curves[name] = _read_curves(run_dir / "metrics.jsonl")
            gallery_size = next(iter(result["gallery_size"]["all"].values()))
            unseen_queries = result["num_queries"].get("unseen", 0)
    runs = {name: {k: round(statistics.fmean(per_seed[s][name][k] for s in seeds), 2) for k in METRICS}
            for name in RUNS}
    results = {
        "gallery_size": gallery_size,
        "seconds": round(time.monotonic() - started, 1),
        "runs": runs,
        "chance": {"R@1": round(100 / gallery_size, 2), "R@10": round(1000 / gallery_size, 2), "R_subset@1": 20.0},
        "seeds": list(seeds),
        "per_seed": {str(s): per_seed[s] for s in seeds},
        "training": train_info,
        "test_queries": len(bench.queries("test")),
        "unseen_queries": unseen_queries,
        "budget_minutes": budget_minutes,
        "data": str(data),
    }
    if len(seeds) > 1:
        results["std"] = {name: {k: round(statistics.stdev(per_seed[s][name][k] for s in seeds), 2) for k in METRICS}
                          for name in RUNS}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(render_report(results))
    plot_curves(curves, out / "curves.png")
    plot_retrievals(out / f"seed{seeds[0]}" / "offset_test_rankings.jsonl", bench, out / "retrievals.png")
    return results


def _read_curves(path: Path) -> dict:
    train, val = [], []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            train.append((row["step"], row["loss"]))
        if "eval" in row:
            val.append((row["step"], row["eval"].get("R@10", float("nan"))))
    return {"train": train, "val": val}


def _verdict(a: float, b: float, what: str) -> str:
    diff = a - b
    if abs(diff) < 1.0:
        return f"{what}: no clear difference (R@10 {a:.2f} vs {b:.2f})."
    return f"{what}: {'yes' if diff > 0 else 'no'} (R@10 {a:.2f} vs {b:.2f}, {diff:+.2f} points)."


def render_report(results: dict) -> str:
    runs, std = results["runs"], results.get("std")
    lines = [
        "# offset-cir demo: synthetic cluttered scenes",
        "",
        f"Test split: {results['test_queries']} queries ({results['unseen_queries']} with an unseen shape/colour pair), "
        f"gallery of {results['gallery_size']} images. Seeds: {results['seeds']}. "
        f"Whole run: {results['seconds'] / 60:.1f} min.",
        "",
        "| model | " + " | ".join(METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    for name, metrics in runs.items():
        cells = [f"{metrics[k]:.2f}" + (f" ± {std[name][k]:.2f}" if std else "") for k in METRICS]
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    ch = results["chance"]
    lines += [
        f"| chance | {ch['R@1']:.2f} | | {ch['R@10']:.2f} | | {ch['R_subset@1']:.2f} | |",
        "",
        "Did the masks help (OFFSET vs OFFSET w/o FM)? " + _verdict(runs["offset"]["R@10"], runs["offset_wo_fm"]["R@10"], "masks help"),
        "",
        "Did OFFSET beat the baseline (OFFSET vs late fusion)? " + _verdict(runs["offset"]["R@10"], runs["late_fusion"]["R@10"], "OFFSET beats late fusion"),
        "",
        "All three models train for the same number of steps (the number OFFSET reached within its share of the "
        "budget) from random initialisation of the `tiny` backbone; the checkpoint with the best validation score "
        "is evaluated. Training steps and seconds per run are in `results.json` (`training`).",
        "",
        "![curves](curves.png)",
        "",
        "![retrievals](retrievals.png)",
        "",
    ]
    return "\n".join(lines)


def plot_curves(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, c in curves.items():
        if c["train"]:
            s, v = zip(*c["train"])
            ax1.plot(s, v, label=LABELS[name], lw=1)
        if c["val"]:
            s, v = zip(*c["val"])
            ax2.plot(s, v, marker="o", label=LABELS[name])
    ax1.set(xlabel="step", ylabel="training loss", title="training loss")
    ax2.set(xlabel="step", ylabel="validation R@10 (%)", title="validation R@10")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_retrievals(rankings: Path, bench, path: Path, n_queries: int = 6, k: int = 5) -> None:
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    rows = [json.loads(line) for line in rankings.read_text().splitlines()][:: max(1, 40)][:n_queries]
    fig, axes = plt.subplots(len(rows), k + 3, figsize=(1.6 * (k + 3), 1.8 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        ax = axes[r][0]
        ax.imshow(Image.open(bench.image_path(row["reference"])).convert("RGB"))
        ax.set_title("reference", fontsize=7)
        axes[r][1].text(0.0, 0.5, "\n".join(textwrap.wrap(row["text"], 22)), fontsize=7, va="center")
        for c, image_id in enumerate(row["top"][:k]):
            ax = axes[r][c + 2]
            ax.imshow(Image.open(bench.image_path(image_id)).convert("RGB"))
            hit = image_id == row["target"]
            ax.set_title(f"#{c + 1}" + (" target" if hit else ""), fontsize=7, color="green" if hit else "black")
            if hit:
                for spine in ax.spines.values():
                    spine.set_edgecolor("green")
                    spine.set_linewidth(3)
        ax = axes[r][k + 2]
        ax.imshow(Image.open(bench.image_path(row["target"])).convert("RGB"))
        rank = row["top"].index(row["target"]) + 1 if row["target"] in row["top"] else None
        ax.set_title(f"target (rank {rank})" if rank else "target (rank > 50)", fontsize=7, color="green")
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][1].axis("off")
    fig.suptitle("OFFSET on the synthetic test split (every 40th query): reference, text, top-5, and the true target",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(results: dict) -> str:
    width = max(len(v) for v in LABELS.values()) + 2
    head = f"{'model':<{width}}" + "".join(f"{m:>13}" for m in METRICS)
    lines = [head, "-" * len(head)]
    for name, metrics in results["runs"].items():
        lines.append(f"{LABELS[name]:<{width}}" + "".join(f"{metrics[m]:>13.2f}" for m in METRICS))
    lines.append(f"{'chance':<{width}}{results['chance']['R@1']:>13.2f}{'':>13}{results['chance']['R@10']:>13.2f}"
                 f"{'':>13}{results['chance']['R_subset@1']:>13.2f}")
    return "\n".join(lines)

