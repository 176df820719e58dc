"""``offset export``: a checkpoint as two ONNX graphs (query, target) + export.json (see ``offset_cir.export``)."""
from __future__ import annotations

import argparse

NAME = "export"
HELP = "export a checkpoint to ONNX (query and target graphs, optional int8)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="trained OFFSET checkpoint (folder or model.safetensors)")
    parser.add_argument("--out", required=True, help="folder to write query.onnx, target.onnx and export.json to")
    parser.add_argument("--int8", action="store_true",
                        help="also write int8 graphs (onnxruntime dynamic quantisation of the weights)")
    parser.add_argument("--overwrite", action="store_true", help="replace the content of a non-empty --out")
    parser.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript",
                        help="torch.onnx exporter (default torchscript: exact, and much faster to export)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset version (default 18)")


def run(args: argparse.Namespace) -> int:
    from offset_cir.export.onnx import export_checkpoint

    rep = export_checkpoint(args.checkpoint, args.out, int8=args.int8, overwrite=args.overwrite,
                            exporter=args.exporter, opset=args.opset)
    d = rep.max_abs_diff
    print(f"exported {args.checkpoint} to {rep.path} ({rep.meta['exporter']} exporter, opset {rep.meta['opset']})")
    for role in ("query", "target"):
        g = rep.meta["graphs"][role]
        inputs = ", ".join(f"{i['name']} {i['shape']}" for i in g["inputs"])
        line = f"  {g['file']}: {inputs} -> features [batch, {rep.meta['embed_dim']}]; max |onnxruntime - torch| " \
               f"{d[role]:.2e}"
        if rep.int8_max_abs_diff is not None:
            line += f"; {g['int8_file']}: max |int8 - torch| {rep.int8_max_abs_diff[role]:.2e}"
        print(line)
    return 0
