"""Merging weight changes ("task vectors") into one: TIES (Yadav et al., NeurIPS 2023,
"TIES-Merging: Resolving Interference When Merging Models").

WISE merges its knowledge shards with it: each shard is a change D_i of the same weight,
trained on its own edits in its own random subspace, and the merge keeps, entry by entry,
what most of the shards agree on instead of summing changes that cancel or pile up.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def trim_to_density(delta: torch.Tensor, density: float) -> torch.Tensor:
    """`delta` with all but its int(density * numel) largest-magnitude entries set to zero
    (ties at the cut broken by `torch.topk`); `density >= 1` keeps everything."""
    if density >= 1:
        return delta.clone()
    keep = int(density * delta.numel())
    if keep <= 0:
        raise ValueError(f"trim_to_density: density={density} keeps no entry of "
                         f"{delta.numel()}: give a density above {1 / delta.numel():.2g}")
    flat = delta.reshape(-1)
    kept = torch.zeros_like(flat)
    index = flat.abs().topk(keep).indices
    kept[index] = flat[index]
    return kept.view_as(delta)


def ties_merge(deltas: Sequence[torch.Tensor], weights: Sequence[float],
               density: float) -> torch.Tensor:
    """One change from several changes of the same weight, by TIES:

    1. trim: each delta keeps its `density` fraction of largest-magnitude entries;
    2. elect: per entry, the sign of the weighted sum of the trimmed deltas (>= 0 counts as +);
    3. disjoint mean: per entry, sum_i w_i d_i over the deltas whose (non-zero) entry has the
       elected sign, divided by the sum of those w_i (1 where none has).

    With equal weights step 3 is the plain mean of the agreeing entries, so the scale of one
    shard's change survives the merge of many.
    """
    if len(deltas) == 0 or len(deltas) != len(weights):
        raise ValueError(f"ties_merge: {len(deltas)} deltas and {len(weights)} weights: give "
                         f"one weight per delta, at least one delta")
    trimmed = torch.stack([trim_to_density(d, density) for d in deltas])
    w = torch.tensor(list(weights), dtype=trimmed.dtype, device=trimmed.device)
    w = w.view(-1, *([1] * (trimmed.dim() - 1)))
    weighted = trimmed * w
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(trimmed.dtype)
    agree = (weighted.sign() == elected).to(trimmed.dtype)  # zero entries never agree
    divisor = (w * agree).sum(0)
    divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return (weighted * agree).sum(0) / divisor
