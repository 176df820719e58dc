"""`offset train --config PRESET_OR_FILE [key=value ...]` and `offset train --resume RUN_DIR`."""
from __future__ import annotations

import json


def add_arguments(p) -> None:
    p.add_argument("--config", default=None, help="preset (fashioniq, shoes, cirr, fashion200k, synthetic), "
                   "experiment name (e.g. cirr_wo_fm) or a YAML file")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue an interrupted run from its folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. model.backbone=tiny batch_size=8 optim.new_lr=1e-3")


def run(args) -> int:
    from offset_cir.errors import UserInputError
    from offset_cir.train.config import load_config
    from offset_cir.train.trainer import Trainer, _to_yaml

    if args.resume:
        if args.config or args.overrides:
            raise UserInputError("--resume continues a run with its saved config: give no --config or overrides")
        trainer = Trainer(None, resume=args.resume, progress=not args.no_progress)
    else:
        if not args.config:
            raise UserInputError("give --config PRESET_OR_FILE (see `offset info`) or --resume RUN_DIR")
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(_to_yaml(cfg.to_dict()))
            return 0
        trainer = Trainer(cfg, progress=not args.no_progress)
    summary = trainer.fit()
    if trainer.dist.is_main:
        print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))
    return 130 if summary["stopped"] == "interrupted" else 0
