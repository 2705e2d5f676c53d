"""PMET (Li et al., AAAI 2024, "PMET: Precise Model Editing in a Transformer").

MEMIT writes the residual-stream target z into the FFNs, although that hidden state also
carries what attention (MHSA) and the residual path contributed. PMET optimises targets for
both Transformer components of the last edited layer L jointly, then updates only the FFN,
with the FFN's own target. Implemented objective, for each request i (prompts x_j ⊕ p_i over
the context templates; a^L, m^L the attention and FFN outputs at the subject's last token):

    min over delta_i^a, delta_i^m
        mean_j -log P(o_i | x_j ⊕ p_i ; a^L += delta_i^a, m^L += delta_i^m)
        + kl_factor * KL(P_0 || P_delta) on "{subject} is a"
        + v_weight_decay * (||delta_i^a|| / ||a_i^L||^2 + ||delta_i^m|| / ||m_i^L||^2)
    s.t. ||delta_i^a|| <= clamp_factor ||a_i^L||,  ||delta_i^m|| <= clamp_factor ||m_i^L||

    z_i^m = m_i^L + delta_i^m         (z_i^a is optimised but not written anywhere: MHSA
                                       weights stay as they are, the paper's finding)
    for j = 0..L-1:  R_j = (z^m - m^L_current) / sqrt(L - j)     square-root spread
                     Delta_j = R_j K_j^T (lambda C + K_j K_j^T)^{-1}   (MEMIT's solve)

keys and m^L_current re-read after each layer is written (residual="per_layer", as the
reference code); "once" is available as for MEMIT.

Deviations from the reference code (EasyEdit `pmet/compute_zs.py`, `pmet_main.py`): all
requests are optimised in one batch (the deltas are per request, so this is the same
optimisation); each request stops once its mean NLL < early_stop_nll, instead of the
reference's dynamic NLL factor (x0.1 once the target is the argmax, stop when the KL term
is < 0.01) and its stop on total loss < 5e-2; the solve is a float64 Cholesky solve, not
`torch.inverse`. Defaults follow the reference's Llama-7B configuration (clamp_factor 1,
kl_factor 0.0625, lambda as MEMIT's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ...linalg import TargetValues
from ...requests import EditRequest
from ..base import EditResult, register_method
from ..config import PAPER, sourced
from .memit import MemitConfig, MemitEditor


@dataclass
class PmetConfig(MemitConfig):
    """PMET: MEMIT's fields; clamp_factor bounds each component's delta by its own norm."""

    clamp_factor: float = sourced(1.0, PAPER)


class PmetEditor(MemitEditor):
    """PMET: MEMIT's loop with the target taken in the FFN output of a joint (attention, FFN)
    optimisation and the residual spread by the square root of the remaining layers."""

    config_cls = PmetConfig
    value_site = "mlp_out"  # R_j is measured in the FFN output at the last edited layer
    spread_exponent = 0.5

    def compute_target(self, requests: Sequence[EditRequest]) -> TargetValues:
        """z^m: the FFN target of the joint (MHSA, FFN) optimisation at the last layer."""
        joint = self.joint_target_values(requests, self.layers[-1], ("attn_out", "mlp_out"))
        # Kept for diagnostics only: PMET never writes the attention target into weights.
        norms = getattr(self, "_attn_delta_norm", {})
        norms.update(zip((r.uid for r in requests), joint["attn_out"].delta.norm(dim=1).tolist()))
        self._attn_delta_norm = norms
        return joint["mlp_out"]

    def compute(self, requests: Sequence[EditRequest]) -> EditResult:
        result = super().compute(requests)
        norms = getattr(self, "_attn_delta_norm", {})
        result.info["attn_delta_norm"] = [norms.pop(r.uid, None) for r in requests]
        return result


register_method("pmet", PmetConfig, PmetEditor,
                "MEMIT with separate MHSA/FFN targets, FFN-only update (Li et al. 2024)")
