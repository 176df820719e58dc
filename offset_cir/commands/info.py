"""`offset info`: versions, backbones, presets and experiments."""
from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("--all-backbones", action="store_true", help="list every OpenCLIP ViT name too")


def run(args) -> int:
    import platform

    import open_clip
    import torch

    import offset_cir
    from offset_cir.model.backbone import PACKAGE_BACKBONES, available_backbones
    from offset_cir.model.config import ABLATIONS
    from offset_cir.train.config import preset_names

    print(f"offset-cir {offset_cir.__version__}  torch {torch.__version__}  open_clip {open_clip.__version__}  "
          f"python {platform.python_version()}  cuda {'yes' if torch.cuda.is_available() else 'no'}")
    names = available_backbones()
    print("package backbones (offline, random init):", ", ".join(sorted(PACKAGE_BACKBONES)))
    vits = [n for n in names if n not in PACKAGE_BACKBONES]
    print(f"OpenCLIP ViTs ({len(vits)}):", ", ".join(vits if args.all_backbones else vits[:12] + ["..."]))
    p = preset_names()
    print("presets:", ", ".join(p["presets"]))
    print("experiments:", ", ".join(p["experiments"]))
    print("ablations:", ", ".join(ABLATIONS))
    return 0
