"""Regenerate documentation/HYPERPARAMETERS.md from train_enhanced.py's parser.

    python documentation/make_hyperparameters_md.py > documentation/HYPERPARAMETERS.md
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from src.training import train_enhanced as te  # noqa: E402


def main() -> None:
    p = te.build_parser()
    print("# Hyperparameters and flags of `train_enhanced.py`\n")
    print("Every flag, its default, and what the profiles set. Explicit flags override a profile's values:")
    print("`--profile quick --epochs 10` runs the quick profile for 10 epochs. Booleans have an on and an off form.")
    print("Generated from the parser by `documentation/make_hyperparameters_md.py`; "
          "`python -m src.training.train_enhanced --help` shows the same.\n")
    print("## Profiles\n")
    keys = sorted({k for v in te.PROFILES.values() for k in v})
    names = sorted(te.PROFILES)
    print("| flag | default | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    defaults = {a.dest: a.default for g in p._action_groups for a in g._group_actions}
    for k in keys:
        cells = " | ".join(f"`{te.PROFILES[n][k]}`" if k in te.PROFILES[n] else "" for n in names)
        print(f"| `--{k}` | `{defaults.get(k)}` | {cells} |")
    print("\n`quick` is the offline profile for CPUs, the tests and CI; `rtx3060` is the overnight default on a CUDA")
    print("GPU (an RTX 3060 12 GB is the reference card). Without `--profile`, the overnight scripts pick `rtx3060`")
    print("where `nvidia-smi` finds a GPU and `quick` otherwise.\n")
    for g in p._action_groups[2:]:
        print(f"## {g.title[0].upper() + g.title[1:]}\n")
        print("| flag | default | meaning |")
        print("|---|---|---|")
        for a in g._group_actions:
            flag = ", ".join(f"`{o}`" for o in a.option_strings)
            d = a.default
            if isinstance(a, argparse._StoreFalseAction):
                d = ""
            elif a.dest == "output_dir":
                d = "models/theta_enhanced_<YYYYMMDD_HHMMSS>"
            elif isinstance(d, Path):
                d = d.relative_to(te.PROJECT_ROOT) if d.is_relative_to(te.PROJECT_ROOT) else d
            shown = "" if d == "" else ("none" if d is None else f"`{d}`")
            choices = f" ({', '.join(a.choices)})" if a.choices else ""
            print(f"| {flag} | {shown} | {a.help}{choices} |")
        print()


if __name__ == "__main__":
    main()
