"""CaliNET's memory term per Adam step: over every memory row, or only over the rows where a
slot fires (`methods.patches.firing_rows`, what CaliNET and T-Patcher run).

    python bench/patch_memory.py --state bench/out/calinet-cf-1000/<tag>.state-700

Reads a saved editing state (`EditHandle.save` of a calinet sequence, e.g. a resume point
of bench/sequential.py): its memory bank (the MLP inputs of every earlier
edit's texts) and the last edit's neurons. Times the memory term's forward + backward both
ways, checks they give the same loss, and reports the fraction of memory rows that fire.
Writes <out>/patch_memory.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--state", required=True, help="a saved calinet state folder")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default="bench/out/patch-memory")
    args = ap.parse_args(argv)

    from factedit.methods.patches import firing_rows, neuron_output
    from factedit.protocol.state import read_state

    # The project's reader checks the digest; the editor's own manifest names its tensors.
    manifest, tensors = read_state(args.state)
    editor = manifest["editor"]
    if manifest["method"] != "calinet" or not editor.get("memory_edits"):
        raise SystemExit(f"{args.state}: a calinet state with a memory bank is needed (this "
                         f"times CaliNET's memory term; got {manifest['method']!r} with "
                         f"{len(editor.get('memory_edits', []))} banked edits)")
    layers = editor["layers"]
    bank = {layer: torch.cat([tensors[f"editor/memory.{edit_id}.{layer}"]
                              for edit_id in editor["memory_edits"]]) for layer in layers}
    last_edit = max(edit_id for edit_id, _ in editor["entries"])
    last = {layer: {f: tensors[f"editor/{i}.{f}"] for f in ("keys", "bias", "values")}
            for i, (edit_id, layer) in enumerate(editor["entries"]) if edit_id == last_edit}
    params = {layer: tuple(last[layer][f].clone().requires_grad_(True)
                           for f in ("keys", "bias", "values")) for layer in layers}

    def dense() -> torch.Tensor:
        return sum(neuron_output(bank[layer], *p).pow(2).sum(-1).mean()
                   for layer, p in params.items())

    def firing() -> torch.Tensor:
        return sum(neuron_output(firing_rows(bank[layer], p[0], p[1]), *p).pow(2).sum()
                   / len(bank[layer]) for layer, p in params.items())

    row = {"state": args.state, "threads": torch.get_num_threads(),
           "memory_rows": {layer: len(bank[layer]) for layer in layers},
           "firing_fraction": {layer: float(((bank[layer] @ p[0].T + p[1]) > 0).any(1)
                                            .float().mean()) for layer, p in params.items()}}
    losses = {}
    for name, term in (("dense", dense), ("firing_rows", firing)):
        term().backward()  # warm-up
        start = time.perf_counter()
        for _ in range(args.repeats):
            loss = term()
            loss.backward()
        row[f"ms_per_step_{name}"] = (time.perf_counter() - start) / args.repeats * 1000
        losses[name] = float(loss.detach())
    row["loss_difference"] = abs(losses["dense"] - losses["firing_rows"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "patch_memory.json").write_text(json.dumps(row, indent=1))
    print("memory rows per layer | firing fraction | ms/step dense | ms/step firing rows | "
          "|loss diff|")
    print(f"{row['memory_rows']} | "
          f"{ {k: round(v, 4) for k, v in row['firing_fraction'].items()} } | "
          f"{row['ms_per_step_dense']:.1f} | {row['ms_per_step_firing_rows']:.1f} | "
          f"{row['loss_difference']:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
