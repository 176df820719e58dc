"""The embedded default (``offset demo`` / ``make demo``): on the synthetic cluttered-scene benchmark, train
OFFSET, OFFSET without masks (ablation w/o FM) and a late-fusion baseline (w/o FM + w/o MG-FP + w/o Revision)
for the same fixed number of steps, evaluate them on the test split, build a search index of the test images with
OFFSET's best checkpoint, and write ``results.json``, ``report.md``, ``curves.png`` and ``retrievals.png``.

Everything the runs do comes from a preset (``offset_cir/configs/demo.yaml``: the packaged pretrained backbone
``efficientnet-lite0-minilm``, frozen but for its last image blocks, its frozen part cached on disk, the release's
learning rates, a fixed step count), so a rerun on the same data writes the same metrics however busy the machine
is. The benchmark's generator settings come from the preset's ``demo:`` section.
"""
from __future__ import annotations

import logging
import shutil
import statistics
import time
from importlib import resources
from pathlib import Path

from offset_cir.io import read_jsonl, write_json, write_text
from offset_cir.plots import new_figure, save_figure

log = logging.getLogger(__name__)

RUNS: dict[str, list[str]] = {
    "offset": [],
    "offset_wo_fm": ["wo_fm"],
    "late_fusion": ["wo_fm", "wo_mgfp", "wo_revision"],
}
LABELS = {"offset": "OFFSET", "offset_wo_fm": "OFFSET w/o FM (no masks)", "late_fusion": "late fusion baseline"}
METRICS = ["R@1", "R@5", "R@10", "R@50", "R_subset@1", "unseen_R@10"]
DEFAULT_PRESET = "demo"
# Keys of a demo preset's ``demo:`` section (everything else is a training config, `offset train --config`).
DEMO_KEYS = {"synthetic", "test_batch_size", "index"}


def load_demo_preset(preset: str = DEFAULT_PRESET) -> tuple[dict, str]:
    """(the ``demo:`` section, the training config YAML without it) of a demo preset (a name or a YAML file)."""
    import yaml

    from offset_cir.errors import UserInputError

    path = Path(preset)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        text = path.read_text()
    else:
        candidate = resources.files("offset_cir") / "configs" / f"{preset}.yaml"
        if not candidate.is_file():
            raise UserInputError(f"demo preset {preset!r}: no such YAML file or packaged preset")
        text = candidate.read_text()
    data = yaml.safe_load(text) or {}
    section = data.pop("demo", None) or {}
    unknown = sorted(set(section) - DEMO_KEYS)
    if unknown:
        raise UserInputError(f"demo preset {preset!r}: unknown keys {unknown} in its demo: section "
                             f"(known: {sorted(DEMO_KEYS)})")
    return section, yaml.safe_dump(data, sort_keys=False)


def _train_cfg(config_yaml: Path, name: str, ablations: list[str], data: Path, out: Path, seed: int,
               cache: Path | None, overrides: list[str]):
    from offset_cir.train.config import load_config

    extra = [f"model.ablate=[{','.join(ablations)}]"] if ablations else []
    if cache is not None:
        extra.append(f"feature_cache={cache}")
    return load_config(str(config_yaml), [f"name={name}", f"data.root={data}", f"out_dir={out}", f"seed={seed}",
                                          *extra, *overrides])


def _best_model(run_dir: Path, cfg):
    """The run's best checkpoint (else its last), reading through the run's feature cache when it had one."""
    from offset_cir.model.checkpoint import load_checkpoint
    from offset_cir.train.cache import setup_small_compute

    ckpt = run_dir / "best" if (run_dir / "best").is_dir() else run_dir / "last"
    model = load_checkpoint(ckpt)
    cache = setup_small_compute(cfg, model)  # freezes as in training; attaches the cache (None without one)
    return model, ckpt, cache


def _test_metrics(model, cache, bench, meta: dict, rankings: Path, batch_size: int,
                  progress: bool) -> tuple[dict, dict, dict]:
    """(R@K metrics, the evaluation result, the per-attribute top-1 table) on the test split; the rankings are
    written to ``rankings``."""
    from offset_cir.eval.attributes import rankings_table
    from offset_cir.eval.evaluate import evaluate
    from offset_cir.train.cache import warm_benchmark

    if cache is not None:
        warm_benchmark(cache, bench, ["test"], masks=model.uses_masks, progress=progress)
    result = evaluate(model, bench, "synthetic", split="test", batch_size=batch_size, save_rankings=rankings,
                      progress=False)
    table = rankings_table(rankings, meta, "test", result["gallery"][0])
    return {k: round(result["metrics"][k], 2) for k in METRICS if k in result["metrics"]}, result, table


def _build_demo_index(index_dir: Path, images: Path, model, ckpt: Path, progress: bool) -> dict:
    """The search index of the test images with OFFSET's best checkpoint (rebuilt when the checkpoint changed)."""
    from offset_cir.search.build import build_index

    manifest = index_dir / "manifest.json"
    if manifest.is_file():
        try:
            return _index_summary(build_index(index_dir, images, model=model, checkpoint=ckpt, progress=progress))
        except Exception as exc:  # the demo's own index of an earlier checkpoint: the demo rebuilds its outputs
            log.info("rebuilding the demo's index %s (%s)", index_dir, exc)
            shutil.rmtree(index_dir)
    return _index_summary(build_index(index_dir, images, model=model, checkpoint=ckpt, progress=progress))


def _index_summary(report) -> dict:
    return {"path": report.path, "images": report.count, "encoded": report.encoded}


DEFAULT_DATA_DIR = "data/synthetic-demo"


def demo_benchmark(data: Path, synth: dict, progress: bool = True) -> None:
    """Generate the demo's synthetic benchmark in ``data`` (reused as is when it exists with these settings).

    The demo's own folder (``DEFAULT_DATA_DIR``) holding the benchmark of another preset is generated again;
    a folder the user named (``--data``) is never replaced: the generator's error says what to do.
    """
    from offset_cir.data.synthetic import META_NAME, generate
    from offset_cir.errors import UserInputError

    try:
        generate(data, progress=progress, **synth)
    except UserInputError:
        if Path(data) != Path(DEFAULT_DATA_DIR) or not (Path(data) / META_NAME).is_file():
            raise
        log.warning("%s holds the synthetic benchmark of another demo preset: generating this preset's", data)
        generate(data, progress=progress, overwrite=True, **synth)


def run_demo(out_dir="runs/demo", data_dir=DEFAULT_DATA_DIR, seeds=(0,), overrides: list[str] | None = None,
             progress: bool = True, synth_kwargs: dict | None = None, preset: str = DEFAULT_PRESET,
             build_search_index: bool = True) -> dict:
    """Run the demo for each seed; returns the results dict also written to ``out_dir/results.json``.

    ``overrides`` (``key=value``) change the preset's training config for all runs; ``synth_kwargs`` the
    generator settings of its ``demo.synthetic`` section.
    """
    from offset_cir.data import get_dataset
    from offset_cir.data.synthetic import load_meta
    from offset_cir.extras import import_extra

    started = time.monotonic()
    out, data = Path(out_dir), Path(data_dir)
    out.mkdir(parents=True, exist_ok=True)
    section, config_text = load_demo_preset(preset)
    config_yaml = out / "demo_config.yaml"  # the preset's training config, as the runs read it
    write_text(config_yaml, config_text)
    synth = {"seed": 0, **(section.get("synthetic") or {}), **(synth_kwargs or {})}
    log.info("synthetic benchmark in %s (%s)", data, ", ".join(f"{k}={v}" for k, v in synth.items()))
    import_extra("matplotlib", "train", "the demo's figures")  # before anything is trained
    demo_benchmark(data, synth, progress)
    bench, meta = get_dataset("synthetic", data), load_meta(data)
    overrides = list(overrides or [])
    probe = _train_cfg(config_yaml, "probe", [], data, out, 0, None, overrides)
    demo = _DemoRuns(config_yaml, data, out, bench, meta, overrides, progress,
                     cache_dir=(out / "feature_cache") if probe.freeze_backbone and probe.feature_cache else None,
                     test_batch=int(section.get("test_batch_size", 128)))
    for si, seed in enumerate(seeds):
        for name in RUNS:
            demo.run(seed, name, first_seed=si == 0,
                     index=build_search_index and section.get("index", True) and name == "offset")
    results = _results(demo, probe, section, seeds, bench, meta, data, synth, preset, time.monotonic() - started)
    if demo.index_info is not None:
        results["index"] = demo.index_info
        results["serve_command"] = f"offset serve --index {out / 'index'}"
    write_json(out / "results.json", results)
    write_text(out / "report.md", render_report(results))
    plot_curves(demo.curves, out / "curves.png")
    plot_retrievals(out / f"seed{seeds[0]}" / "offset_test_rankings.jsonl", bench, out / "retrievals.png", meta=meta)
    return results


def _results(demo: "_DemoRuns", probe, section: dict, seeds, bench, meta: dict, data: Path, synth: dict, preset: str,
             seconds: float) -> dict:
    """What results.json holds: the recipe, each model's test metrics (mean over seeds, per seed, std), the
    per-attribute table, chance levels and what each run's training did."""
    from offset_cir.eval.attributes import chance_shares
    from offset_cir.eval.metrics import chance_levels

    results = {
        "backbone": {"name": probe.model.backbone, "pretrained": probe.model.pretrained},
        "recipe": recipe_of(probe, section),
        "gallery_size": demo.gallery_size,
        "seconds": round(seconds, 1),
        "runs": {name: _mean(demo.per_seed, seeds, name) for name in RUNS},
        "chance": {k: round(v, 2) for k, v in chance_levels(demo.gallery_size).items()},  # reference excluded: N-1
        "seeds": list(seeds),
        "per_seed": {str(s): demo.per_seed[s] for s in seeds},
        "training": demo.train_info,
        "test_queries": len(bench.queries("test")),
        "unseen_queries": demo.unseen_queries,
        "data": str(data),
        "synthetic": synth,
        "preset": preset,
        **_attribute_results(demo.attributes, seeds),
        "attributes_chance": chance_shares(meta, "test"),
    }
    if len(seeds) > 1:
        results["std"] = {name: _std(demo.per_seed, seeds, name) for name in RUNS}
    return results


class _DemoRuns:
    """The demo's runs (train one model for one seed, test it) and what they gathered."""

    def __init__(self, config_yaml: Path, data: Path, out: Path, bench, meta: dict, overrides: list[str],
                 progress: bool, cache_dir: Path | None, test_batch: int):
        self.config_yaml, self.data, self.out, self.bench, self.meta = config_yaml, data, out, bench, meta
        self.overrides, self.progress, self.cache_dir, self.test_batch = overrides, progress, cache_dir, test_batch
        self.per_seed: dict[int, dict] = {}
        self.attributes: dict[int, dict] = {}
        self.curves: dict[str, dict] = {}
        self.train_info: dict[str, dict] = {}
        self.index_info = None
        self.gallery_size = self.unseen_queries = 0

    def run(self, seed: int, name: str, first_seed: bool, index: bool) -> None:
        """Train ``name`` (a key of RUNS) with ``seed``, test its best checkpoint, keep what it gave."""
        from offset_cir.train.trainer import Trainer

        run_dir = self.out / f"seed{seed}" / name
        cfg = _train_cfg(self.config_yaml, name, RUNS[name], self.data, run_dir, seed, self.cache_dir, self.overrides)
        if run_dir.exists():  # the demo's own run of an earlier call
            shutil.rmtree(run_dir)
        log.info("seed %d: training %s (%s) for %s steps", seed, LABELS[name], ", ".join(RUNS[name]) or "full model",
                 cfg.max_steps)
        summary = Trainer(cfg, progress=self.progress).fit()
        if summary["stopped"] == "time budget":
            log.warning("%s stopped by the safety time cap (time_budget_minutes=%s) after %d of %s steps: this "
                        "result depends on the machine's speed", name, cfg.time_budget_minutes, summary["steps"],
                        cfg.max_steps)
        model, ckpt, cache = _best_model(run_dir, cfg)
        rankings = self.out / f"seed{seed}" / f"{name}_test_rankings.jsonl"
        metrics, result, table = _test_metrics(model, cache, self.bench, self.meta, rankings, self.test_batch,
                                               self.progress)
        self.per_seed.setdefault(seed, {})[name] = metrics
        self.attributes.setdefault(seed, {})[name] = table
        self.train_info.setdefault(name, {})[str(seed)] = {
            "steps": summary["steps"], "stopped": summary["stopped"], "best_step": summary["best_step"],
            "seconds": round(summary["seconds"], 1)}
        if first_seed:
            self.curves[name] = _read_curves(run_dir / "metrics.jsonl")
            if index:
                self.index_info = _build_demo_index(self.out / "index", self.data / "test", model, ckpt, self.progress)
        self.gallery_size = next(iter(result["gallery_size"]["all"].values()))
        self.unseen_queries = result["num_queries"].get("unseen", 0)


def _mean(per_seed: dict, seeds, name: str) -> dict:
    return {k: round(statistics.fmean(per_seed[s][name][k] for s in seeds), 2) for k in METRICS}


def _std(per_seed: dict, seeds, name: str) -> dict:
    return {k: round(statistics.stdev(per_seed[s][name][k] for s in seeds), 2) for k in METRICS}


def _attribute_results(tables: dict[int, dict], seeds) -> dict:
    """results.json's per-attribute top-1 accuracy: the mean share per model over the seeds (``attributes``),
    the std (``attributes_std``, several seeds), each seed's shares and the queries asking for each attribute."""
    from offset_cir.eval.attributes import asked_counts, mean_shares, shares_of, std_shares

    out = {
        "attributes": {name: mean_shares([tables[s][name] for s in seeds]) for name in RUNS},
        "attributes_per_seed": {str(s): {name: shares_of(tables[s][name]) for name in RUNS} for s in seeds},
        "attributes_asked": asked_counts(tables[seeds[0]]["offset"]),
    }
    if len(seeds) > 1:
        out["attributes_std"] = {name: std_shares([tables[s][name] for s in seeds]) for name in RUNS}
    return out


def recipe_of(cfg, section: dict) -> dict:
    """What the runs trained with, for results.json and the report."""
    return {
        "steps": cfg.max_steps, "batch_size": cfg.batch_size, "backbone_lr": cfg.optim.backbone_lr,
        "new_lr": cfg.optim.new_lr, "weight_decay": cfg.optim.weight_decay,
        "decay_epochs_1based": cfg.optim.decay_epochs_1based,
        "freeze_backbone": cfg.freeze_backbone, "trainable_image_blocks": cfg.trainable_image_blocks,
        "trainable_text_blocks": cfg.trainable_text_blocks, "feature_cache": bool(cfg.feature_cache),
        "random_crops": not (cfg.freeze_backbone and cfg.feature_cache), "eval_every_steps": cfg.eval_every_steps,
        "selection": "best validation checkpoint (sum of R@1/5/10/50 and R_subset@1/2/3 on val)",
        "precision": cfg.precision, "time_cap_minutes": cfg.time_budget_minutes,
    }


def _read_curves(path: Path) -> dict:
    train, val = [], []
    for row in read_jsonl(path):
        if "loss" in row:
            train.append((row["step"], row["loss"]))
        if "eval" in row:
            val.append((row["step"], row["eval"].get("R@10", float("nan"))))
    return {"train": train, "val": val}


def attribute_table(results: dict, markdown: bool = False) -> str:
    """The per-attribute top-1 table of the three models (mean over the seeds, ± std with several) and chance."""
    from offset_cir.eval.attributes import format_attribute_table

    rows = {LABELS[name]: shares for name, shares in results["attributes"].items()}
    stds = {LABELS[name]: s for name, s in results.get("attributes_std", {}).items()}
    rows["chance (a random image)"] = results["attributes_chance"]
    return format_attribute_table(rows, results["attributes_asked"], stds, markdown=markdown)


def verdicts(results: dict) -> list[str]:
    """The answers the demo gives, one sentence each: do masks help, does OFFSET beat late fusion (over the
    seeds and per seed), how often OFFSET's top-1 result has the colour the text asks for."""
    runs, per = results["runs"], results["per_seed"]
    out = [
        "Did the masks help (OFFSET vs OFFSET w/o FM)? " + _verdict(runs["offset"]["R@10"], runs["offset_wo_fm"]["R@10"], "masks help"),
        "Did OFFSET beat the baseline (OFFSET vs late fusion)? " + _verdict(runs["offset"]["R@10"], runs["late_fusion"]["R@10"], "OFFSET beats late fusion"),
    ]
    if len(results["seeds"]) > 1:
        out.append("Per seed, R@10 (OFFSET / w/o FM / late fusion): " + "; ".join(
            f"seed {s}: {per[s]['offset']['R@10']:.2f} / {per[s]['offset_wo_fm']['R@10']:.2f} / "
            f"{per[s]['late_fusion']['R@10']:.2f}" for s in per) + ". Masks help on "
            f"{sum(per[s]['offset']['R@10'] > per[s]['offset_wo_fm']['R@10'] for s in per)} of {len(per)} seeds, "
            f"OFFSET beats late fusion on "
            f"{sum(per[s]['offset']['R@10'] > per[s]['late_fusion']['R@10'] for s in per)} of {len(per)}.")
    colour, asked = results["attributes"]["offset"]["colour"], results["attributes_asked"]["colour"]
    if colour is not None:
        seeds = results["attributes_per_seed"]
        each = (" (per seed: " + ", ".join(f"{seeds[s]['offset']['colour']:.1f}" for s in seeds) + ")"
                if len(seeds) > 1 else "")
        out.append(f"Does OFFSET's top result have the colour the text asks for? For {colour:.1f} % of the {asked} "
                   f"test queries that ask for a colour{each}; a random image has it for "
                   f"{results['attributes_chance']['colour']:.1f} %.")
    return out


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
        "## What the top result has of what the text asks for",
        "",
        "Share of the test queries whose text asks for an attribute (a change, or one it says to keep) whose top-1 "
        "result has the asked value; *all*: every attribute the text asks for. Chance: a random image of the "
        "gallery.",
        "",
        attribute_table(results, markdown=True),
        "",
        *(line for v in verdicts(results) for line in (v, "")),
        _recipe_sentence(results),
        "",
        
        "![curves](curves.png)",
        "",
        "![retrievals](retrievals.png)",
        "",
    ]
    if "serve_command" in results:
        lines += [f"The test images are indexed with OFFSET's best checkpoint (seed {results['seeds'][0]}) in "
                  f"`{results['index']['path']}` ({results['index']['images']} images). Search them:", "",
                  f"    {results['serve_command']}", ""]
    return "\n".join(lines)


def _recipe_sentence(results: dict) -> str:
    r, b = results["recipe"], results["backbone"]
    if r["freeze_backbone"]:
        frozen = (f"frozen except the last {r['trainable_image_blocks']} image-tower blocks"
                  if r["trainable_image_blocks"] else "frozen")
        if r["trainable_text_blocks"]:
            frozen += f" and the last {r['trainable_text_blocks']} text-tower blocks"
        if r["feature_cache"]:
            frozen += " (its frozen part's outputs cached on disk, so no random crops)"
        how = f"the backbone {frozen}, its new projections and OFFSET's modules at lr {r['new_lr']:g}"
        if r["trainable_image_blocks"] or r["trainable_text_blocks"]:
            how += f", the trainable backbone blocks at {r['backbone_lr']:g}"
    else:
        how = f"the whole backbone at lr {r['backbone_lr']:g}, the new modules at {r['new_lr']:g}"
    init = f"pretrained ({b['pretrained']})" if b["pretrained"] else "random initialisation"
    return (f"All three models train for the same fixed number of steps ({r['steps']}, batch {r['batch_size']}) on "
            f"the `{b['name']}` backbone from {init}: {how}. The checkpoint with the best validation score is "
            f"evaluated. Steps and seconds per run are in `results.json` (`training`), the recipe in `recipe`.")


def plot_curves(curves: dict, path: Path) -> None:
    fig = new_figure((11, 4), purpose="the demo's figures")
    ax1, ax2 = fig.subplots(1, 2)
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
    save_figure(fig, path, dpi=110)


def plot_retrievals(rankings: Path, bench, path: Path, n_queries: int = 6, k: int = 5, meta: dict | None = None) -> None:
    """The retrieval sheet of every 40th query; with the benchmark's metadata ``meta``, each shown image is marked
    with the attributes the text asks for that it has (a tick) or not (a cross)."""
    from offset_cir.eval.attributes import asked_marks
    from offset_cir.eval.sheet import draw_retrieval_sheet

    rows = read_jsonl(rankings)[:: max(1, 40)][:n_queries]
    draw_retrieval_sheet(rows, bench.image_path, path, k=k, marks=asked_marks(meta, "test") if meta else None,
                         title="OFFSET on the synthetic test split (every 40th query): reference, text, top-5, "
                               "and the true target; under each, what the text asks for that it has")


def format_table(results: dict) -> str:
    width = max(len(v) for v in LABELS.values()) + 2
    head = f"{'model':<{width}}" + "".join(f"{m:>13}" for m in METRICS)
    lines = [head, "-" * len(head)]
    for name, metrics in results["runs"].items():
        lines.append(f"{LABELS[name]:<{width}}" + "".join(f"{metrics[m]:>13.2f}" for m in METRICS))
    lines.append(f"{'chance':<{width}}{results['chance']['R@1']:>13.2f}{'':>13}{results['chance']['R@10']:>13.2f}"
                 f"{'':>13}{results['chance']['R_subset@1']:>13.2f}")
    return "\n".join(lines)

