"""AlphaEdit (Fang et al., ICLR 2025): MEMIT's update projected onto the null space of C.

    P = U U^T,  U = eigenvectors of C with eigenvalue < nullspace_threshold * max eigenvalue
    for j = 0..L-1 (layer l_j), K, R as in MEMIT (R = (z - h^L) / (L - j)):
        Delta_j = R K^T P (K_p K_p^T P + K K^T P + alpha I)^{-1}
                = R K^T P (P (K_p K_p^T + K K^T) P + alpha I)^{-1}   (same matrix, SPD form:
                                                                 see linalg.null_space_update)
                = (R K^T U) (U^T (K_p K_p^T + K K^T) U + alpha I)^{-1} U^T
                                    (what is solved: m x m, m = dim of the null space; see
                                     linalg.null_space_update)
    afterwards K_p K_p^T += K K^T for every layer (the running sum of earlier edits' keys),
    kept also as U^T K_p K_p^T U so an edit's system costs O(m^2 n), not O(d_in^3).

Where P goes (reference `AlphaEdit_main.py`): the reference solves
(P (K K^T + K_p K_p^T) + alpha I) Delta^T = P K R^T, i.e. P multiplies the key statistics and
the right-hand side from the side of the keys, and C itself does not enter the solve (P stands
in for MEMIT's lambda C). Since Delta = Delta P, Delta k = 0 for every k in the span C keeps:
preserved knowledge is untouched by construction, independently of R.

The reference adds to K_p the keys read after the whole edit is written; a layer's key only
depends on the layers below it, so with residual="per_layer" those are exactly the K_j the
loop solved with, and the editor accumulates them without another forward pass.

The threshold is relative to C's largest eigenvalue (the reference uses an absolute 2e-2 on
its Llama-3/GPT-J statistics; a relative one carries over to other models' scales). On
SmolLM2-135M's statistics (wikitext-2, 100k tokens) 1e-2 keeps 802 / 861 / 826 / 1,054 / 1,371
of 1,536 directions at layers 4-8, and 0.05 keeps 1,439-1,518 (bench/RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...linalg import WoodburySolver, keys_added_solve, null_space_update
from ...models import EditableModel
from ...requests import EditRequest
from ..base import ConfigError, EditResult, MethodConfig, register_method
from ..config import PAPER, check_choice, check_positive, sourced
from .base import RESIDUAL_MODES, LocateEditConfig, LocateEditor, SystemMatrix


def check_null_space_fields(config: MethodConfig) -> None:
    """The two AlphaEdit fields, shared by every config that projects onto C's null space."""
    check_positive(config, "alpha")
    threshold = config.nullspace_threshold
    if not (isinstance(threshold, (int, float)) and 0 < threshold < 1):
        raise ConfigError(f"{type(config).__name__}.nullspace_threshold={threshold!r}: give a "
                          f"fraction of C's largest eigenvalue in (0, 1), e.g. 1e-2")


def projected_update(editor: LocateEditor, layer: int, RK: torch.Tensor, KK: torch.Tensor,
                     threshold: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RK P (P KK P + alpha I)^{-1}, the reduced system U^T KK U + alpha I), P = U U^T the
    projector onto C's null space (solved in U's coordinates: linalg.null_space_update)."""
    U = editor.null_basis(layer, threshold)
    return null_space_update(U, RK @ U, U.T @ KK @ U, alpha,
                             f"AlphaEdit system at layer {layer}")


@dataclass
class AlphaEditConfig(LocateEditConfig):
    """AlphaEdit.

    clamp_factor: 0.75 (the reference's Llama-3-8B value).
    nullspace_threshold: directions of C with eigenvalue below this fraction of the largest
        form the null space the update lives in.
    alpha: the ridge term (the reference's L2 = 10).
    residual: "per_layer" (the reference, as MEMIT) or "once".
    """

    clamp_factor: float = sourced(0.75, PAPER)
    nullspace_threshold: float = sourced(1e-2, PAPER)
    alpha: float = sourced(10.0, PAPER)
    residual: str = sourced("per_layer", PAPER)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_null_space_fields(self)
        check_choice(self, "residual", RESIDUAL_MODES)


class AlphaEditEditor(LocateEditor):
    """AlphaEdit: MEMIT's layer loop with each update projected onto the null space of C and
    solved against the keys of all earlier edits (K_p K_p^T, kept per layer)."""

    config_cls = AlphaEditConfig
    config: AlphaEditConfig

    def __init__(self, model: EditableModel, config: AlphaEditConfig) -> None:
        super().__init__(model, config)
        self._kp: dict[int, torch.Tensor] = {}  # K_p K_p^T per layer, (d_in, d_in) float64
        # U^T K_p K_p^T U per layer (m, m): the same sum in the null space's coordinates, so
        # an edit forms its system from its own keys only (no d_in^3 product per edit).
        self._kp_null: dict[int, torch.Tensor] = {}
        # layer -> the factor of U^T K_p K_p^T U + alpha I, grown by each committed edit's
        # keys (Woodbury) while its token is that layer's _kp_null tensor: an edit then costs
        # triangular solves for its own keys instead of an m x m factorisation (m ~ d_in).
        self._solvers: dict[int, WoodburySolver] = {}

    def _null(self, layer: int) -> torch.Tensor:
        return self.null_basis(layer, self.config.nullspace_threshold)

    def _kp_reduced(self, layer: int) -> torch.Tensor:
        if layer not in self._kp_null:
            U = self._null(layer)
            self._kp_null[layer] = (U.T @ self._kp[layer] @ U if layer in self._kp
                                    else torch.zeros(U.shape[1], U.shape[1], dtype=torch.float64))
        return self._kp_null[layer]

    def _history_solver(self, layer: int) -> WoodburySolver | None:
        """The factor of U^T K_p K_p^T U + alpha I (None: not positive definite)."""
        committed = self._kp_reduced(layer)
        solver = self._solvers.get(layer)
        if solver is None or solver.token is not committed:
            eye = torch.eye(committed.shape[0], dtype=torch.float64)
            solver = WoodburySolver.factor(committed + self.config.alpha * eye)
            if solver is None:
                return None
            solver.token = committed
            self._solvers[layer] = solver
        return solver

    def solve_layer(self, j: int, layer: int, K: torch.Tensor, R: torch.Tensor
                    ) -> tuple[torch.Tensor, SystemMatrix]:
        """W_j + (R KU^T) (KU KU^T + U^T K_p K_p^T U + alpha I)^{-1} U^T, KU = U^T K, and
        that system (a function where the kept factor solved it: built only when its
        condition number is logged)."""
        U = self._null(layer)
        KU = U.T @ K.to(torch.float64)  # (m, n): the keys in the null space's coordinates
        alpha = self.config.alpha

        def gram() -> torch.Tensor:  # U^T (K K^T + K_p K_p^T) U
            return KU @ KU.T + self._kp_reduced(layer)

        solver = self._history_solver(layer) if torch.isfinite(KU).all() else None
        if solver is None:  # the direct solve: its eigen fallback and errors name the matrix
            delta, A = null_space_update(U, R @ KU.T, gram(), alpha,
                                         f"AlphaEdit system at layer {layer}")
            return self.weight64(layer) + delta, A
        # R KU^T A^{-1} = R (A^{-1} KU)^T with A = (the history's system) + KU KU^T, by
        # Woodbury; the n solved columns go back through U before meeting R, so no
        # d_out x m x d_in product is formed.
        X = U @ keys_added_solve(solver.solve(KU), KU)  # A^{-1} KU in input space, (d_in, n)
        eye = torch.eye(U.shape[1], dtype=torch.float64)
        return self.weight64(layer) + R.to(torch.float64) @ X.T, lambda: gram() + alpha * eye

    def compute(self, requests: Sequence[EditRequest]) -> EditResult:
        """One edit; its keys join K_p (and the kept factors of the history system) only once the
        edit has succeeded."""
        result, terms = self.edit_layers(requests, self.solve_layer, self.config.residual)
        # Committed only now: a failed edit must not leave its keys in K_p.
        for layer, (K, _R) in terms.items():
            KU = self._null(layer).T @ K
            before = self._kp_reduced(layer)
            self._kp_null[layer] = before + KU @ KU.T
            self._kp[layer] = self._kp.get(layer, 0) + K @ K.T
            solver = self._solvers.get(layer)
            if solver is not None and solver.token is before and solver.room(KU.shape[1]):
                solver.add(KU.to(torch.float64))
                solver.token = self._kp_null[layer]
        return result

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, manifest = self.locate_state()
        tensors.update({f"KpKp.{layer}": kk for layer, kk in self._kp.items()})
        return tensors, manifest

    def load_state_dict(self, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
        self.load_locate_state(tensors, manifest)
        self._kp = {layer: tensors[f"KpKp.{layer}"].to(torch.float64)
                    for layer in self.layers if f"KpKp.{layer}" in tensors}
        self._kp_null = {}  # rebuilt from _kp on first use


register_method("alphaedit", AlphaEditConfig, AlphaEditEditor,
                "MEMIT projected onto the null space of preserved keys (Fang et al. 2025)")
