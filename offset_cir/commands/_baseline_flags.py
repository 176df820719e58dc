"""The flags that choose a training-free baseline (a backbone's own features) instead of a trained model.

``offset eval`` and ``offset index`` take ``--baseline MODE`` with ``--backbone NAME [--pretrained TAG_OR_FILE]``,
or with ``--checkpoint CKPT`` for that checkpoint's backbone (:func:`add_baseline_arguments`,
:func:`check_model_flags`, :func:`baseline_spec`); ``offset search`` and ``offset serve`` take ``--baseline MODE``
and ``--pretrained`` for an index built that way (:func:`add_query_baseline_arguments`). Not a command itself.
"""
from __future__ import annotations

import argparse

from offset_cir.errors import UserInputError


def add_baseline_arguments(parser: argparse.ArgumentParser, baseline_help: str) -> None:
    """``--baseline``, ``--backbone`` and ``--pretrained``, in a group of their own."""
    from offset_cir.model.baseline import BASELINES

    base = parser.add_argument_group("training-free baseline (instead of a trained model)")
    base.add_argument("--baseline", choices=BASELINES, help=baseline_help)
    base.add_argument("--backbone", metavar="NAME", help="with --baseline: the backbone (`offset info` lists them)")
    base.add_argument("--pretrained", metavar="TAG_OR_FILE",
                      help="with --backbone: an OpenCLIP tag, a local weights file, or 'packaged' (default: "
                           "'packaged' for a packaged backbone, else random weights)")


def check_model_flags(args) -> None:
    """A trained model (``--checkpoint``) or a baseline with one backbone: refuse any other combination, naming
    the flags, before anything is loaded."""
    if args.baseline is None:
        if args.backbone or args.pretrained:
            raise UserInputError("--backbone and --pretrained choose a baseline's backbone: give --baseline too")
        if args.checkpoint is None:
            raise UserInputError("give --checkpoint CKPT, or --baseline MODE with --backbone NAME (or --checkpoint "
                                 "CKPT for its backbone)")
    elif (args.backbone is None) == (args.checkpoint is None):
        raise UserInputError(f"--baseline {args.baseline} needs its backbone: --backbone NAME [--pretrained ...] "
                             "or --checkpoint CKPT (one of them)")
    elif args.pretrained and not args.backbone:
        raise UserInputError("--pretrained goes with --backbone")


def baseline_spec(args):
    """The :class:`~offset_cir.model.baseline.BaselineSpec` the (checked) flags name; None without ``--baseline``."""
    if args.baseline is None:
        return None
    from offset_cir.model.baseline import BaselineSpec

    if args.backbone is not None:
        return BaselineSpec(args.baseline, backbone=args.backbone, pretrained=args.pretrained)
    return BaselineSpec(args.baseline, checkpoint=str(args.checkpoint))


def add_query_baseline_arguments(parser: argparse.ArgumentParser) -> None:
    """``--baseline`` and ``--pretrained`` of ``offset search`` / ``offset serve``: for an index built with a
    baseline, the query side and (when the recorded file moved) its backbone's weights."""
    from offset_cir.model.baseline import BASELINES

    base = parser.add_argument_group("an index built with a training-free baseline (`offset index --baseline`)")
    base.add_argument("--baseline", choices=BASELINES,
                      help="the query side: the reference image's features, the text's, or their normalised sum "
                           "(default: the mode the index was built with; the gallery is the same for all three)")
    base.add_argument("--pretrained", metavar="TAG_OR_FILE",
                      help="the backbone's weights when the file the index records has moved (checked against "
                           "the index)")
