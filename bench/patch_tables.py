"""Markdown tables of bench/results/patch_sizes.json, quant_survival_n<N>.json and a
sequence's quantization survival (bench/quant_survival.py --patch: one folder of per-type JSON).

    python bench/patch_tables.py [--sizes FILE] [--quant FILE] [--sequence DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def size(n_bytes: float) -> str:
    for unit, scale in (("MB", 1e6), ("KB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes:.0f} B"


def sizes_table(data: dict) -> str:
    lines = ["| method | edits | mode | patch file | forms (rank per weight) | saved state | "
             "full model save | build s | load s | apply s | max abs diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        forms = ", ".join(sorted({f"{w['form']} {w.get('rank', '')}".strip()
                                  for w in r["weights"].values()})) or "editor state"
        lines.append(
            f"| {r['method']} | {r['n']} | {r['mode']} | {size(r['patch_bytes'])} | "
            f"{len(r['weights'])} x {forms} | {size(r['state_bytes'])} | "
            f"{size(r['full_model_bytes'])} | {r['build_seconds']:.2f} | "
            f"{r['load_seconds']:.3f} | {r['apply_seconds']:.2f} | "
            f"{r['max_abs_weight_difference']:.1e} |")
    return "\n".join(lines)


def quant_table(data: dict) -> str:
    lines = ["| type | efficacy | generalization | specificity | generation | unedited: "
             "efficacy / generalization / specificity / generation | read-back max abs diff |",
             "|---|---|---|---|---|---|---|"]
    for qtype, r in data["types"].items():
        e, u = r["edited"], r["unedited"]
        verify = r.get("verify_max_abs_diff")
        lines.append(
            f"| {qtype} | {e['efficacy']:.2f} | {e['generalization']:.2f} | "
            f"{e['specificity']:.2f} | {e['generation']:.2f} | {u['efficacy']:.2f} / "
            f"{u['generalization']:.2f} / {u['specificity']:.2f} / {u['generation']:.2f} | "
            f"{'-' if verify is None else f'{verify:.1e}'} |")
    return "\n".join(lines)


def sequence_table(folder: Path) -> str:
    """One row per GGUF type of a `quant_survival.py --patch` folder: the edited model's
    teacher-forced and generation scores, the same type's unedited model beside them."""
    lines = ["| type | efficacy | generalization | specificity | gen_efficacy | "
             "gen_generalization | gen_specificity (n) | unedited: efficacy / generalization / "
             "specificity / gen_efficacy / gen_generalization | weight change error |",
             "|---|---|---|---|---|---|---|---|---|"]
    order = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")
    for qtype in order:
        path = folder / f"{qtype}.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        e, u = r["edited"], r["unedited"]
        change = max(r["weight_change_error"].values())
        lines.append(
            f"| {qtype} | {e['efficacy']:.2f} | {e['generalization']:.2f} | "
            f"{e['specificity']:.2f} | {e['gen_efficacy']:.2f} | {e['gen_generalization']:.2f} | "
            f"{e['gen_specificity']:.2f} ({e['gen_specificity_n']}) | {u['efficacy']:.2f} / "
            f"{u['generalization']:.2f} / {u['specificity']:.2f} / {u['gen_efficacy']:.2f} / "
            f"{u['gen_generalization']:.2f} | {change:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="bench/results/patch_sizes.json")
    ap.add_argument("--quant", default="bench/results/quant_survival_n20.json")
    ap.add_argument("--sequence", default="bench/results/quant-survival-d4s-n1000")
    args = ap.parse_args(argv)
    for path, table in ((args.sizes, sizes_table), (args.quant, quant_table)):
        if Path(path).is_file():
            data = json.loads(Path(path).read_text())
            print(f"{path} ({data['date']}; {data['command']})\n")
            print(table(data))
            print()
    folder = Path(args.sequence)
    if folder.is_dir():
        print(f"{folder}\n")
        print(sequence_table(folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
