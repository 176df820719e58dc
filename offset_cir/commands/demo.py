"""`offset demo`: the synthetic benchmark end to end (what `make demo` runs)."""
from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("--out", default="runs/demo", help="where results.json, report.md and the plots go")
    p.add_argument("--data", default="data/synthetic", help="the synthetic benchmark (generated when absent)")
    p.add_argument("--budget-minutes", type=float, default=11.0,
                   help="wall-clock budget of the demo per seed (default 11: `make demo` with set-up stays under 15)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (results are averaged)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="training overrides for all three runs")


def run(args) -> int:
    from offset_cir.demo import format_table, run_demo

    results = run_demo(args.out, args.data, args.budget_minutes, tuple(args.seeds), args.overrides,
                       progress=not args.no_progress)
    print()
    print(format_table(results))
    print(f"\ngallery {results['gallery_size']} images, {results['seconds'] / 60:.1f} min; "
          f"report: {args.out}/report.md, plots: {args.out}/curves.png, {args.out}/retrievals.png")
    return 0
