"""`offset demo`: the synthetic benchmark end to end (what `make demo` runs)."""
from __future__ import annotations

NAME = "demo"
HELP = "synthetic benchmark end to end: train OFFSET and two comparisons, evaluate, report"


def add_arguments(p) -> None:
    p.add_argument("--out", default="runs/demo", help="where results.json, report.md, the plots and the index go")
    p.add_argument("--data", default="data/synthetic-demo",
                   help="the synthetic benchmark, generated with the preset's settings when absent")
    p.add_argument("--preset", default="demo",
                   help="the demo preset: a name in offset_cir/configs (demo, demo_tiny) or a YAML file; it fixes "
                        "the backbone, the recipe and the number of steps (default demo)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (results are averaged)")
    p.add_argument("--no-index", action="store_true", help="skip building the search index of the test images")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="training overrides for all three runs")


def run(args) -> int:
    from offset_cir.demo import attribute_table, format_table, run_demo, verdicts
    from offset_cir.eval.attributes import TABLE_TITLE

    results = run_demo(args.out, args.data, tuple(args.seeds), args.overrides, progress=not args.no_progress,
                       preset=args.preset, build_search_index=not args.no_index)
    print()
    print(format_table(results))
    print(f"\n{TABLE_TITLE} on the test split:")
    print(attribute_table(results))
    print()
    for line in verdicts(results):
        print(line)
    recipe = results["recipe"]
    print(f"\nbackbone {results['backbone']['name']} ({results['backbone']['pretrained'] or 'random init'}), "
          f"{recipe['steps']} steps per run; gallery {results['gallery_size']} images, "
          f"{results['seconds'] / 60:.1f} min; report: {args.out}/report.md, plots: {args.out}/curves.png, "
          f"{args.out}/retrievals.png")
    if "serve_command" in results:
        print(f"search the test images: {results['serve_command']}")
    return 0
