"""The memory term of T-Patcher / CaliNET per Adam step: over every memory row, or only over
the rows where a neuron fires (`methods.patches.firing_rows`, what the editors run).

    python bench/patch_memory.py --state bench/out/calinet-cf-1000/<tag>.state-700

Reads a saved editing state (`EditHandle.save` of a t-patcher or calinet sequence, e.g. a
resume point of bench/sequential.py): its memory bank (the MLP inputs of every earlier
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
from safetensors.torch import load_file


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--state", required=True, help="a saved t-patcher / calinet state folder")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default="bench/out/patch-memory")
    args = ap.parse_args(argv)

    from factedit.methods.patches import firing_rows, neuron_output

    tensors = load_file(str(Path(args.state) / "state.safetensors"))
    prefix = "editor/"
    memory: dict[int, list[tuple[int, torch.Tensor]]] = {}
    entries: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        name = name.removeprefix(prefix)
        if name.startswith("memory."):
            _, edit_id, layer = name.split(".")
            memory.setdefault(int(layer), []).append((int(edit_id), tensor))
        else:
            index, field = name.split(".")
            entries.setdefault(int(index), {})[field] = tensor
    if not memory:
        raise SystemExit(f"{args.state}: no memory bank (a t-patcher / calinet state saved "
                         f"with memory_history > 0 is needed)")
    bank = {layer: torch.cat([t for _, t in sorted(parts, key=lambda p: p[0])])
            for layer, parts in memory.items()}
    layers = sorted(bank)
    last = {layer: entries[max(entries) - len(layers) + 1 + i] for i, layer in enumerate(layers)}
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
