"""`offset info`: versions, backbones, presets and experiments."""
from __future__ import annotations

NAME = "info"
HELP = "versions, registered backbones and presets"


def add_arguments(p) -> None:
    p.add_argument("--all-backbones", action="store_true",
                   help="list every buildable backbone name of each family, not only the first four")


def run(args) -> int:
    import platform

    import open_clip
    import torch

    import offset_cir
    from offset_cir.model.config import ABLATIONS
    from offset_cir.model.registry import backbone_family, get_backbone_entry, list_backbones
    from offset_cir.train.config import preset_names

    print(f"offset-cir {offset_cir.__version__}  torch {torch.__version__}  open_clip {open_clip.__version__}  "
          f"python {platform.python_version()}  cuda {'yes' if torch.cuda.is_available() else 'no'}")
    own = list_backbones()
    print("backbones of this package:")
    for entry in map(get_backbone_entry, own):
        weights = "pretrained weights install offline" if entry.offline_weights else "no pretrained weights"
        print(f"  {entry.name}: {entry.family}; {entry.summary} ({weights})")
    # Only what this version builds, grouped by tower family (decided from each OpenCLIP config, nothing built).
    by_family: dict[str, list[str]] = {}
    for name in list_backbones(open_clip=True)[len(own):]:
        by_family.setdefault(backbone_family(name), []).append(name)
    print(f"OpenCLIP backbones ({sum(map(len, by_family.values()))}) by family:")
    for family, members in sorted(by_family.items()):
        shown = members if args.all_backbones or len(members) <= 4 else members[:4] + ["..."]
        print(f"  {family} [{len(members)}]: {', '.join(shown)}")
    p = preset_names()
    print("presets:", ", ".join(p["presets"]))
    print("experiments:", ", ".join(p["experiments"]))
    print("ablations:", ", ".join(ABLATIONS))
    return 0
