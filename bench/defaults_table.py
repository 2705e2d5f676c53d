"""The defaults table (docs/results/defaults/README.md): per method on SmolLM2-135M, its
default and the best setting found, at N = 1 (single edits), 100 and 1,000 sequential edits,
teacher-forced and generation metrics, every cell read from a committed result JSON.

    python bench/defaults_table.py            # prints the Markdown, writes the JSON below

Writes bench/results/defaults/table.json. A cell no JSON holds is "-" (not measured). Every
number is on the check split (`counterfact`, EasyEdit's counterfact-edit.json); the d4s
setting was chosen on `counterfact-train` (bench/results/defaults/sweep_d4s_*.json).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TF = ("efficacy", "generalization", "specificity")
GEN = ("gen_efficacy", "gen_generalization")

# (method, row label, setting, N=1 source, sequential source) where a source is
# (path under bench/results, key) or None. N = 1: a bench/mirage.py summary (key: its label);
# sequential: a bench/sequential.py JSON (checkpoints at 100 and 1,000), or a list of them;
# identity: a bench/defaults_sweep.py --identity JSON and the row's overrides (N sequential
# edits as the one batch on W_0 they equal), or a list of such pairs. Sources fill a cell's
# metrics in order, sequential first: a later source only adds metrics an earlier one lacks
# (e.g. the generation metrics of a run that scored the first K requests, noted "first K").
ROWS: list[dict] = [
    {"method": "rome", "row": "default", "setting": "layer 6, values on 5 x 10-token prefixes",
     "single": ("mirage/summary.json", "rome"), "sequential": None},
    {"method": "rome", "row": "bare values", "setting": "context_prefixes=0",
     "single": None, "sequential": "rome_n1000.json"},
    {"method": "memit", "row": "default", "setting": "layers 4-8, lambda 5,000, prefixes 5 x 10",
     "single": ("mirage/summary.json", "memit"), "sequential": None},
    {"method": "memit", "row": "bare values", "setting": "context_prefixes=0",
     "single": None, "sequential": "memit_n1000.json"},
    {"method": "alphaedit", "row": "default", "setting": "layers 4-8, alpha 10, null space 1e-2",
     "single": ("mirage/summary.json", "alphaedit"), "sequential": None},
    {"method": "alphaedit", "row": "bare values", "setting": "context_prefixes=0",
     "single": None, "sequential": "alphaedit_n1000.json"},
    {"method": "d4s", "row": "old default", "setting": "lambda 5,000, prefixes 5 x 10",
     "single": ("mirage/summary.json", "d4s"), "sequential": "d4s_prefixes5_n100.json"},
    {"method": "d4s", "row": "new default", "setting": "lambda 5,000, bare values "
     "(context_prefixes=0)", "single": None, "sequential": "d4s_lambda5000_n1000.json",
     "identity": [("defaults/check_d4s_counterfact_n100_generation.json", {}),
                  ("defaults/check_d4s_counterfact_n1000_generation200.json", {})]},
    {"method": "d4s", "row": "best scores found", "setting": "lambda 2,500, bare values "
     "(twice the weight change; not the default)", "single": None, "sequential": None,
     "identity": ("defaults/check_d4s_counterfact_n100_batch-identity.json",
                  {"mom2_update_weight": 2500})},
    {"method": "d4s-alphaedit", "row": "default", "setting": "alpha 10, residual once, "
     "prefixes 5 x 10", "single": None, "sequential": None},
    {"method": "d4s-alphaedit", "row": "default, bare values", "setting": "context_prefixes=0",
     "single": None, "sequential": "d4s-alphaedit_n1000.json"},
    {"method": "d4s-alphaedit", "row": "best found (headline)", "setting": "alpha 15, "
     "residual per_layer, null 0.05, layers 2-8, prefixes 2 x 5, key columns each, bare 0.5",
     "single": None, "sequential": [
         "d4s-alphaedit_per_layer_alpha15_null05_layers2-8_prefix2x5_keycolumns-each_bare05_n1000"
         ".json", "defaults/d4s-alphaedit_headline_counterfact_sequential1_n100_generation.json"]},
    {"method": "ft-l", "row": "old default (EasyEdit's)",
     "setting": "layer 6, 25 steps, lr 5e-4, L-inf 5e-3",
     "single": ("defaults/ft-l-check/summary.json", "easyedit-lr5e-4-linf5e-3"),
     "sequential": "gradient-editors/ft-l_counterfact_sequential1_n1000.json"},
    {"method": "ft-l", "row": "new default (2026-12-07)", "setting": "lr 1e-3, L-inf 1e-2",
     "single": ("defaults/ft-l-check/summary.json", "default-lr1e-3-linf1e-2"),
     "sequential": "defaults/ft-l_new-defaults_counterfact_sequential1_n100.json"},
    {"method": "ft-m", "row": "default", "setting": "layer 6, 25 steps, lr 5e-4, target loss",
     "single": ("mirage/summary.json", "ft-m"),
     "sequential": "gradient-editors/ft-m_counterfact_sequential1_n1000.json"},
    {"method": "grace", "row": "default", "setting": "layer 23, eps 1, 100 steps",
     "single": ("mirage/summary.json", "grace"),
     "sequential": "keep-counterfact-n100/grace_counterfact_sequential1_n100.json"},
]


def pick(scores: dict, keys: tuple[str, ...]) -> dict:
    return {k: scores.get(k) for k in keys}


def _listed(source) -> list:
    if source is None:
        return []
    return list(source) if isinstance(source, list) else [source]


def fill(out: dict, key: str, scores: dict, extra: dict) -> None:
    """Add `scores`' TF and GEN metrics that out[key] lacks; `extra` (source, seconds, scored)
    goes beside them, under "more" when the cell had a source already."""
    cell = out.get(key)
    if cell is None:
        out[key] = {**pick(scores, TF + GEN), **extra}
        return
    added = {k: scores.get(k) for k in TF + GEN if cell.get(k) is None and scores.get(k) is not None}
    if added:
        cell.update(added)
        cell.setdefault("more", []).append({**extra, "metrics": sorted(added)})


def cells(row: dict) -> dict:
    """{"n1": {...}, "n100": {...}, "n1000": {...}} from the row's sources (None: absent)."""
    out: dict = {"n1": None, "n100": None, "n1000": None}
    if row["single"]:
        path, key = row["single"]
        data = json.loads((RESULTS / path).read_text())
        s = data["summary"][key]
        out["n1"] = {**pick(s, TF + GEN), "n_records": s["n"], "source": f"bench/results/{path}"}
    for path_name in _listed(row["sequential"]):
        path = RESULTS / path_name
        if path.is_file():
            data = json.loads(path.read_text())
            for c in data["checkpoints"]:
                if c["n_edits"] in (100, 1000):
                    fill(out, f"n{c['n_edits']}", c["scores"], {
                        "s_per_edit": c["seconds"] / c["n_edits"],
                        "source": f"bench/results/{path_name}"})
    for path_name, overrides in _listed(row.get("identity")):
        data = json.loads((RESULTS / path_name).read_text())
        for r in data["rows"]:
            if r["overrides"] == overrides:
                extra = {"s_per_edit": r["seconds"] / r["n"], "source": f"bench/results/{path_name}"}
                if r.get("scored", r["n"]) < r["n"]:
                    extra["scored"] = r["scored"]
                fill(out, f"n{r['n']}", r["scores"], extra)
    return out


def fmt(cell: dict | None, keys: tuple[str, ...]) -> str:
    if cell is None or all(cell.get(k) is None for k in keys):
        return "-"
    text = " / ".join("-" if cell.get(k) is None else f"{cell[k]:.2f}" for k in keys)
    scored = [m["scored"] for m in cell.get("more", []) if "scored" in m and set(m["metrics"]) & set(keys)]
    scored += [cell["scored"]] if "scored" in cell else []
    return text + (f" (first {scored[0]})" if scored else "")


def main() -> int:
    table = []
    lines = ["| method | setting | N=1 eff / gen / spec | N=1 gen_eff / gen_gen | "
             "N=100 eff / gen / spec | N=100 gen_eff / gen_gen | N=1000 eff / gen / spec | "
             "N=1000 gen_eff / gen_gen |",
             "|---|---|---|---|---|---|---|---|"]
    for row in ROWS:
        c = cells(row)
        table.append({**row, **c})
        n1 = f" (n={c['n1']['n_records']})" if c["n1"] else ""
        lines.append(f"| {row['method']} | {row['row']}: {row['setting']} | "
                     f"{fmt(c['n1'], TF)}{n1} | {fmt(c['n1'], GEN)} | {fmt(c['n100'], TF)} | "
                     f"{fmt(c['n100'], GEN)} | {fmt(c['n1000'], TF)} | {fmt(c['n1000'], GEN)} |")
    out = RESULTS / "defaults" / "table.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"split": "counterfact (counterfact-edit.json), first N records",
                               "model": "smollm2-135m", "rows": table}, indent=1))
    tmp.replace(out)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
