"""`offset info`: versions, backbones, presets, experiments, datasets and protocols."""
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
    from offset_cir.model.backbone import PACKAGE_BACKBONES, PACKAGED_FACTORIES, available_backbones, backbone_family
    from offset_cir.data import list_datasets
    from offset_cir.eval.protocols import list_protocols
    from offset_cir.model.config import ABLATIONS
    from offset_cir.train.config import preset_names

    print(f"offset-cir {offset_cir.__version__}  torch {torch.__version__}  open_clip {open_clip.__version__}  "
          f"python {platform.python_version()}  cuda {'yes' if torch.cuda.is_available() else 'no'}")
    names = available_backbones()
    print("package backbones (offline, random init):", ", ".join(sorted(PACKAGE_BACKBONES)))
    for name in sorted(PACKAGED_FACTORIES):
        print(f"packaged backbone {name}: {backbone_family(name)}")
    # Only what this version builds, grouped by tower family (decided from each OpenCLIP config, nothing built).
    by_family: dict[str, list[str]] = {}
    for name in names:
        if name not in PACKAGE_BACKBONES and name not in PACKAGED_FACTORIES:
            family = backbone_family(name)
            by_family.setdefault(family, []).append(name)
    print(f"OpenCLIP backbones ({sum(map(len, by_family.values()))}) by family:")
    for family, members in sorted(by_family.items()):
        shown = members if args.all_backbones or len(members) <= 4 else members[:4] + ["..."]
        print(f"  {family} [{len(members)}]: {', '.join(shown)}")
    p = preset_names()
    print("presets:", ", ".join(p["presets"]))
    print("experiments:", ", ".join(p["experiments"]))
    print("ablations:", ", ".join(ABLATIONS))
    print("datasets:", ", ".join(list_datasets()))
    print("protocols:", ", ".join(list_protocols()))
    return 0
