"""D4S + AlphaEdit: AlphaEdit's projected solve over D4S's whole-history sums.

Per edited layer, with D4S's running sums (S_RK = sum_n R_n K_n^T, S_KK = sum_n K_n K_n^T)
and AlphaEdit's projector P onto the null space of C:

    W_n = W_0 + S_RK P (S_KK P + alpha I)^{-1}
        = W_0 + S_RK P (P S_KK P + alpha I)^{-1}      (the SPD form that is solved)

i.e. the AlphaEdit solution of the whole history at once, rather than AlphaEdit's sequence
of deltas each solved on the weights the previous ones left. The update still satisfies
(W_n - W_0) = (W_n - W_0) P, so keys C preserves are untouched; and like D4S, an edit can be
removed exactly and the state saved and resumed. D4S's lambda (mom2_update_weight) plays no
part: P takes the place of lambda C.

With fit="sequential" (d4s module docstring) the sums take R_n + (W_{n-1} - W_0) K_n, and each
step becomes W_n = W_{n-1} + R_n K_n^T P (P S_KK P + alpha I)^{-1}: AlphaEdit's own update,
S_KK being its K_p K_p^T + K K^T. With values_on="current" the sequence equals AlphaEdit's to
rounding (tested); with values_on="original" the values stay on W_0 and can be cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..base import register_method
from ..config import PAPER, sourced
from .alphaedit import check_null_space_fields, projected_update
from .base import SystemMatrix
from .d4s import D4SEditor, D4SHistoryConfig, history_state_size


@dataclass
class D4SAlphaEditConfig(D4SHistoryConfig):
    """D4S's history fields plus AlphaEdit's nullspace_threshold and alpha. D4S's lambda
    (mom2_update_weight) has no part in this solve, so the config has no such field; configs
    saved with it at null still load."""

    nullspace_threshold: float = sourced(1e-2, PAPER)
    alpha: float = sourced(10.0, PAPER)
    retired_fields: ClassVar[dict[str, Any]] = {**D4SHistoryConfig.retired_fields,
                                                "mom2_update_weight": None}

    def __post_init__(self) -> None:
        super().__post_init__()
        check_null_space_fields(self)


class D4SAlphaEditEditor(D4SEditor):
    """D4S's whole-history sums solved with AlphaEdit's null-space projection instead of
    lambda C (module docstring)."""

    config_cls = D4SAlphaEditConfig
    config: D4SAlphaEditConfig
    # Target values are D4S's own (same objective, site and options; only the solve differs),
    # so a value cache filled by d4s serves d4s-alphaedit and the other way round.
    values_like = "D4SEditor"

    def __init__(self, model, config: D4SAlphaEditConfig) -> None:
        super().__init__(model, config)
        # layer -> (S_KK, G, pending): U^T S_KK U = G + sum of P P^T over the projected keys P
        # in `pending`. While that S_KK is the one committed (checked by identity), the next
        # step only appends its own keys' projection; G is formed when a step needs it.
        self._reduced: dict[int, tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]] = {}

    def solve_sums(self, layer: int, S_RK: torch.Tensor, S_KK: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """W_0 + S_RK P (P S_KK P + alpha I)^{-1}, and the reduced system matrix."""
        c = self.config
        delta, A = projected_update(self, layer, S_RK, S_KK, c.nullspace_threshold, c.alpha)
        return self.original_weight(layer) + delta, A

    def incremental_system(self, layer: int, K: torch.Tensor, S_KK: torch.Tensor
                           ) -> tuple[SystemMatrix, torch.Tensor, torch.Tensor]:
        """(U^T S_KK U + alpha I, U^T K, U): the reduced system grows by (U^T K)(U^T K)^T per
        edit and S_RK U by R (U^T K)^T, so D4S's incremental step holds in U's coordinates,
        lifted back by U (linalg.null_space_update). The system is built when called: a
        Woodbury step needs only U^T K."""
        c = self.config
        U = self.null_basis(layer, c.nullspace_threshold)
        KU = U.T @ K
        last = self._reduced.get(layer)
        if last is not None and layer in self._s_kk and last[0] is self._s_kk[layer]:
            # S_KK = committed sum + K K^T (D4SEditor._sums_with)
            self._reduced[layer] = (S_KK, last[1], [*last[2], KU])
        else:  # first step, or after a full solve, a removal, a failed edit or a resume
            self._reduced[layer] = (S_KK, U.T @ S_KK @ U, [])

        def system() -> torch.Tensor:
            """The null-space-projected system of one layer, built from the history sums."""
            S, G, pending = self._reduced[layer]
            if S is not S_KK:
                raise RuntimeError("d4s-alphaedit: a step's system was asked for after the next")
            if pending:
                P = torch.cat(pending, dim=1)
                G = G + P @ P.T
                self._reduced[layer] = (S_KK, G, [])
            return G + c.alpha * torch.eye(U.shape[1], dtype=torch.float64)

        return system, KU, U


register_method("d4s-alphaedit", D4SAlphaEditConfig, D4SAlphaEditEditor,
                "AlphaEdit's null-space solve over D4S's whole-history sums",
                state_size=history_state_size)
