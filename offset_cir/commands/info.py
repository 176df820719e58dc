"""`offset info`: versions, backbones, presets, experiments, datasets and protocols; `--deviations`: where
offset-cir can depart from the authors' release."""
from __future__ import annotations

NAME = "info"
HELP = "versions, registered backbones and presets"


def add_arguments(p) -> None:
    p.add_argument("--all-backbones", action="store_true",
                   help="list every buildable backbone name of each family, not only the first four")
    p.add_argument("--deviations", action="store_true",
                   help="print only the table of every setting where offset-cir can depart from the authors' "
                        "release: the release's value, the default, whether the release presets reproduce it")


def run(args) -> int:
    if args.deviations:
        from offset_cir.train.deviations import deviation_table

        print(deviation_table())
        return 0
    import platform

    import open_clip
    import torch

    import offset_cir
    from offset_cir.data import list_datasets
    from offset_cir.eval.protocols import list_protocols
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
    print("datasets:", ", ".join(list_datasets()))
    print("protocols:", ", ".join(list_protocols()))
    return 0
