"""MEMIT (Meng et al., 2023): many facts at once, spread over several MLP layers.

    z_i = h_i^L + delta_i       target at the last edited layer L (residual stream),
                                delta_i optimised as ROME's v* (linalg.values, site residual)
    for j = 0..L-1 (layer l_j):
        K   = [k_1 .. k_n]                              keys at l_j          (d_in, n)
        R   = (z - h^L) / (L - j)                       residual spread      (d_out, n)
        Delta_j = R K^T (lambda C + K K^T)^{-1}         float64 Cholesky     (d_out, d_in)
        W_j <- W_j + Delta_j, then read K and h^L again for the next layer

`residual="per_layer"` (default) is MEMIT's own order above. `residual="once"` reads the keys
of all layers and h^L before the loop from the unedited model: that is D4S's convention, and
under it a MEMIT batch edit of n requests equals n sequential D4S edits (a test checks this).

lambda = `mom2_update_weight`. C here is E[k k^T] (an average, as the reference's mom2
statistic), so lambda C weighs the preserved keys like lambda samples. What matters is the
ratio to a new key's weight: for one key the layer moves its output by the fraction
s / (1 + s) of R, s = k^T C^{-1} k / lambda, and over corpus keys E[k^T C^{-1} k] = d_in, so
the same lambda is much stronger on a narrow MLP. The reference's 15,000 sits next to
d_in on GPT-J (16,384) and Llama-3-8B (14,336). On SmolLM2-135M (d_in 1,536) subject keys
have k^T C^{-1} k of 2,000-10,000 at layers 4-8, and a MEMIT batch of 5 CounterFact-style
edits flips 5/5 greedy answers at lambda = 1,536 or 5,000 but only 3/5 at 15,000, and in
generated text (not only teacher-forced) 1,500 holds the edit where 5,000 often does not.
Default: the model's MODEL_DEFAULTS entry for the method (SmolLM2: MEMIT and PMET 1,500, D4S
5,000), else MEMIT's, else lambda = d_in (the reference ratio).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ...linalg import (
    memit_solve_is_low_rank,
    memit_system,
    memit_system_operator,
    memit_update,
    solve_update,
)
from ...requests import EditRequest
from ..base import EditResult, register_method
from ..config import MODEL_TABLE, PAPER, check_choice, check_positive, model_default, sourced
from .base import RESIDUAL_MODES, LocateEditConfig, LocateEditor, SystemMatrix


@dataclass
class MemitLayersConfig(LocateEditConfig):
    """MEMIT's layer loop without its solve's weight (what d4s-alphaedit, whose solve has no
    lambda, shares with MEMIT).

    clamp_factor: ||delta_i|| <= 0.75 ||h_i|| (the MEMIT reference value).
    residual: "per_layer" (MEMIT: keys and residual re-read after each layer is written) or
        "once" (read before the loop; D4S's convention).
    """

    clamp_factor: float = sourced(0.75, PAPER)
    residual: str = sourced("per_layer", PAPER)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self, "residual", RESIDUAL_MODES)


@dataclass
class MemitConfig(MemitLayersConfig):
    """MEMIT: the layer loop's fields plus

    mom2_update_weight: lambda, the weight of the preserved-key statistic C (None: the
        model's table entry, else d_in; see the module docstring).
    """

    mom2_update_weight: float | None = sourced(None, MODEL_TABLE)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "mom2_update_weight", optional=True)


class MemitEditor(LocateEditor):
    """MEMIT: z at the last edited layer, then per layer W + R K^T (lambda C + K K^T)^{-1}
    (module docstring)."""

    config_cls = MemitConfig
    config: MemitConfig

    def mom2_weight(self, layer: int) -> float:
        """lambda for `layer`: the config, else the model's table entry for this method
        (d4s on SmolLM2), else for MEMIT, else d_in."""
        if self.config.mom2_update_weight is not None:
            return float(self.config.mom2_update_weight)
        for family in (self.config.method, self.layer_family):
            table = model_default(self.model, family, "mom2_update_weight")
            if table is not None:
                return float(table)
        return float(self.model.weight_shape(layer)[1])

    def solve_layer(self, j: int, layer: int, K: torch.Tensor, R: torch.Tensor
                    ) -> tuple[torch.Tensor, SystemMatrix]:
        """W_j + R K^T (lambda C + K K^T)^{-1}, and that system matrix (where the low-rank
        solve did not need it: as lambda C's factor and the keys, for the condition number)."""
        lam = self.mom2_weight(layer)
        factor = self.preserved_factor(layer, lam) if memit_solve_is_low_rank(K) else None
        if factor is not None:  # a few keys: lambda C's cached factor and Woodbury
            return (self.weight64(layer) + memit_update(R, K, factor),
                    lambda: memit_system_operator(K, factor, self.covariance(layer), lam))
        A = memit_system(self.covariance(layer), K @ K.T, lam)
        return self.weight64(layer) + solve_update(R @ K.T, A, f"MEMIT system at layer {layer}"), A

    def compute(self, requests: Sequence[EditRequest]) -> EditResult:
        return self.edit_layers(requests, self.solve_layer, self.config.residual)[0]


register_method("memit", MemitConfig, MemitEditor,
                "mass edit spread over several MLP layers (Meng et al. 2023)")
