"""ROME (Meng et al., 2022): a rank-one update of one MLP output projection.

    k* = mean key of the subject over context templates          (linalg.keys)
    v* = W k + delta, delta optimised at the MLP output           (linalg.values, site mlp_out)
    u  = C^{-1} k*                                                (linalg.solve, float64)
    W' = W + (v* - W k) u^T / (u^T k)                             so that W' k = v* exactly

k is the key the update is solved for: by default the bare prompt's key (`solve_key="bare"`,
what ROME's reference code does: the edit prompt itself lands exactly on v*); with
`solve_key="mean"` it is k* itself (the paper's formula). The direction u always comes from
the template-averaged k*, which is what makes the edit generalise to other contexts.

ROME edits one fact at a time; a batch is edited sequentially by the protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ...linalg import compute_keys, spd_solve
from ...requests import EditRequest
from ..base import ConfigError, EditResult, register_method
from ..config import PAPER, sourced
from .base import LocateEditConfig, LocateEditor


@dataclass
class RomeConfig(LocateEditConfig):
    """ROME: `layers` must name exactly one layer (default: the model's ROME layer)."""

    clamp_factor: float = sourced(4.0, PAPER)
    solve_key: str = sourced("bare", PAPER)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.key_columns != "mean":
            raise ConfigError(f"RomeConfig.key_columns={self.key_columns!r}: ROME writes one "
                              f"key per request (its rank-one update); use \"mean\"")
        if self.solve_key not in ("bare", "mean"):
            raise ConfigError(f"solve_key={self.solve_key!r}: choose 'bare' or 'mean'")
        if self.layers is not None and len(self.layers) != 1:
            raise ConfigError(f"rome edits one layer; layers={self.layers} names "
                              f"{len(self.layers)}: pass e.g. layers=[6]")


def bare_keys(model, requests, layers):
    """Keys of the edit prompts themselves, without context prefixes."""
    return compute_keys(model, requests, layers, ["{}"])


class RomeEditor(LocateEditor):
    """ROME: one request, one layer, a rank-one update that writes v* at the subject key k*."""

    config_cls = RomeConfig
    supports_batch = False
    layer_family = "rome"
    value_site = "mlp_out"  # v* is the MLP output of the one edited layer

    def compute(self, requests: Sequence[EditRequest]) -> EditResult:
        """The rank-one delta for the single request (C, k* and v* computed or read from the
        caches first)."""
        if len(requests) != 1:
            raise ValueError("rome computes one request at a time (use mode='sequential')")
        (layer,) = self.layers
        result = EditResult()
        with result.timed("context"):
            self.templates()
        with result.timed("covariance"):
            C = self.covariance(layer)
        with result.timed("keys"):
            k_mean = self.keys(requests, [layer])[layer][0]  # (d_in,)
            k = k_mean if self.config.solve_key == "mean" else bare_keys(
                self.model, requests, [layer])[layer][0]
        with result.timed("values"):
            values = self.target(requests)
        with result.timed("solve"):
            u = spd_solve(C, k_mean.unsqueeze(1), what=f"rome covariance at layer {layer}")[:, 0]
            delta_w = torch.outer(values.delta[0], u) / (u @ k)  # (d_out, d_in), rank one
        weight = self.model.mlp_out(layer).weight
        result.deltas[self.weight_param_name(layer)] = self.as_param_delta(delta_w, weight)
        result.info.update(layer=layer, target_nll=values.final_nll[0], v_steps=values.steps[0],
                           key=k, target_delta=values.delta[0])
        return result


register_method("rome", RomeConfig, RomeEditor, "rank-one edit of one MLP (Meng et al. 2022)")
