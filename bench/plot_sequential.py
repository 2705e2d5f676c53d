"""Scores and weight norms vs the number of sequential edits, from bench/sequential.py JSONs.

    python bench/plot_sequential.py bench/results/rome_n1000.json \
        bench/results/d4s_lambda5000_n1000.json=d4s \
        bench/results/d4s-alphaedit_per_layer_alpha20_n1000.json=d4s-alphaedit \
        --out bench/results/sequential_n1000.png

One line per file (FILE=LABEL names it; default: the method). Panels: efficacy,
generalization, specificity, rewrite accuracy and locality after N edits (every request
edited so far, scored then; the unedited model at N = 0), then the paper's measure of the
edited weights, mean |W| (L1 / numel) of the most changed layer relative to W_0, and its
||W - W_0||_F. Prints the plotted numbers as a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SCORES = ("efficacy", "generalization", "specificity", "rewrite_acc", "locality")


def curves(data: dict, w0_mean_abs: dict[str, float]) -> dict:
    """Per panel, the (N, value) points of one run; N = 0 is the unedited model.

    w0_mean_abs: mean |W_0| per weight name (the JSON keeps checkpoints only)."""
    out: dict = {}
    for metric in SCORES:
        points = [] if data["unedited"].get(metric) is None else [(0, data["unedited"][metric])]
        points += [(c["n_edits"], c["scores"][metric]) for c in data["checkpoints"]
                   if c["scores"].get(metric) is not None]
        out[metric] = points
    last = data["checkpoints"][-1]["weight_stats"]
    if last:  # the layer that moved most by the last checkpoint
        layer = max(last, key=lambda name: last[name]["fro_change"])
        stats = [(c["n_edits"], c["weight_stats"][layer]) for c in data["checkpoints"]
                 if layer in c["weight_stats"]]
        start = [(0, w0_mean_abs[layer])] if layer in w0_mean_abs else []
        out["mean_abs"] = start + [(n, s["mean_abs"]) for n, s in stats]
        out["fro_change"] = [(0, 0.0)] + [(n, s["fro_change"]) for n, s in stats]
        out["layer"] = layer
    return out


def unedited_mean_abs(model_name: str, runs: list[dict]) -> dict[str, float]:
    """mean |W_0| of every weight the runs edited, read from the model they edited."""
    import factedit as fe
    from factedit.models.params import read_param

    model = fe.load_model(model_name)
    if any(d["model"] != model.model_id for d in runs):
        raise SystemExit(f"--model {model_name} is {model.model_id}; the files were made on "
                         f"{sorted({d['model'] for d in runs})}")
    names = {name for d in runs for c in d["checkpoints"] for name in c["weight_stats"]}
    return {name: float(read_param(model.model, name).double().abs().mean())
            for name in names}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", metavar="FILE[=LABEL]")
    ap.add_argument("--out", default="bench/out/sequential.png")
    ap.add_argument("--model", default="smollm2-135m",
                    help="the model the files were made on (for mean |W_0| at N = 0)")
    args = ap.parse_args(argv)

    from matplotlib.figure import Figure

    from factedit.lab.store import layer_of

    files = [(Path(path), label) for path, _, label in (f.partition("=") for f in args.files)]
    loaded = [json.loads(path.read_text()) for path, _ in files]
    w0 = unedited_mean_abs(args.model, loaded)
    runs = [(label or data["method"], curves(data, w0))
            for (_, label), data in zip(files, loaded)]
    panels = [*SCORES, "mean_abs", "fro_change"]
    titles = {"mean_abs": "mean |W| of the most changed layer",
              "fro_change": "||W - W0||_F of that layer", "rewrite_acc": "rewrite accuracy"}
    fig = Figure(figsize=(4.2 * 4, 3.3 * 2), layout="constrained")
    axes = fig.subplots(2, 4).ravel().tolist()
    axes[-1].set_visible(False)
    for ax, panel in zip(axes, panels):
        for label, points in runs:
            if points.get(panel):
                ax.plot(*zip(*points[panel]), marker="o", label=label)
        ax.set(title=titles.get(panel, panel), xlabel="sequential edits N")
        if panel in SCORES:
            ax.set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize="small")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)

    header = ["run", "N", *SCORES, "layer", "mean|W|", "||W-W0||"]
    print(" | ".join(header))
    for label, points in runs:
        by_n: dict[int, dict[str, float]] = {}
        for panel in panels:
            for n, v in points.get(panel, []):
                by_n.setdefault(n, {})[panel] = v
        for n in sorted(by_n):
            row = by_n[n]
            print(" | ".join([label, str(n), *(f"{row[m]:.3f}" if m in row else "-"
                                                for m in SCORES),
                              str(layer_of(points["layer"])) if "layer" in points else "-",
                              f"{row['mean_abs']:.4f}" if "mean_abs" in row else "-",
                              f"{row['fro_change']:.1f}" if "fro_change" in row else "-"]))
    print(f"plot: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
