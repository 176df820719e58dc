"""`offset train --config PRESET_OR_FILE [key=value ...]` and `offset train --resume RUN_DIR [budget=value ...]`."""
from __future__ import annotations

import json
import logging

NAME = "train"
HELP = "train a model from a YAML preset or file, with key=value overrides"


def add_arguments(p) -> None:
    p.add_argument("--config", default=None, help="preset (fashioniq, shoes, cirr, fashion200k, synthetic), "
                   "experiment name (e.g. cirr_wo_fm) or a YAML file; machine=NAME (default, server, cpu or a "
                   "YAML file) picks the machine settings: device, data.num_workers, data roots")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue an interrupted run from its folder; key=value may then raise its budget only "
                        "(max_steps, epochs, time_budget_minutes, early_stop_patience)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in out_dir (default: refuse a non-empty out_dir)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. model.backbone=tiny batch_size=8 optim.new_lr=1e-3")


def run(args) -> int:
    from offset_cir.train.signals import stop_signals_handled_by

    # From the very start (the imports below take seconds): a SIGINT/SIGTERM is remembered, and the trainer,
    # which appends to the same list, stops at its first safe point. A second one stops at once.
    received: list[int] = []

    def remember(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)
        logging.getLogger("offset_cir.train").warning(
            "signal %d: stopping once the set-up is done; a second one stops at once", signum)

    with stop_signals_handled_by(remember):
        return _run(args, received)


def _run(args, received: list[int]) -> int:
    from offset_cir.errors import UserInputError
    from offset_cir.train.config import load_config, to_yaml
    from offset_cir.train.trainer import Trainer

    if args.resume:
        if args.config:
            raise UserInputError("--resume continues a run with its saved config: give no --config (key=value may "
                                 "raise its budget, e.g. max_steps=N or epochs=N)")
        if args.overwrite:
            raise UserInputError("--overwrite starts a new run in place of an old one, --resume continues it: give one")
        trainer = Trainer(None, resume=args.resume, progress=not args.no_progress, overrides=args.overrides,
                          stop_signals=received)
    else:
        if not args.config:
            raise UserInputError("give --config PRESET_OR_FILE (see `offset info`) or --resume RUN_DIR")
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(to_yaml(cfg.to_dict()))
            return 0
        trainer = Trainer(cfg, progress=not args.no_progress, overwrite=args.overwrite, stop_signals=received)
    summary = trainer.fit()
    if trainer.dist.is_main:
        print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))
    return 130 if summary["stopped"] == "interrupted" else 0
