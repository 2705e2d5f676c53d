"""D4S (Huang et al., NeurIPS 2024, "Dump for Sequence"): sequential MEMIT without the blow-up.

Sequential MEMIT adds one delta per edit, each solved on already-edited weights, and the
norm of the edited layers grows until the model collapses. D4S keeps, per edited layer, two
float64 running sums over every edit n so far (R_n already carries MEMIT's 1/(L-j) spread):

    S_RK += R_n K_n^T        (d_out, d_in)
    S_KK += K_n K_n^T        (d_in, d_in)
    W_n   = W_0 + S_RK (lambda C + S_KK)^{-1}

and returns W_n - W (W: the weight now), so the model after n edits is MEMIT's batch
solution over the whole history, in memory that does not grow with n. With the reference's
conventions that is exact: n sequential D4S edits equal one MEMIT batch edit of the same n
requests on W_0 with residual="once" (a test checks it).

Options:
    values_on="original" (reference): z, keys and residuals of edit n are computed with the
        edited layers set back to W_0; "current": on the model as it is. Measured at 1,000
        CounterFact edits (bench/RESULTS.md): "current" keeps specificity within 0.02 of the
        unedited model (original: 0.07 below), rewrite accuracy +0.14, weights 13% smaller,
        generalization 0.03 lower; "original" stays the default for the same guarantees.
    residual="once" (reference): keys of every layer and the residual are read once, before
        the layer loop; "per_layer": MEMIT's order (re-read after each layer is written).
        Measured at 1,000 CounterFact edits (bench/RESULTS.md): per_layer keeps specificity
        and locality higher and the weights smaller, generalization 0.03 lower; "once" stays
        the default because only it keeps the batch identity and the exact `remove`.
    solve="full": every edit re-solves A_n X = S_RK^T (a Cholesky factorisation and d_out
        right-hand sides per layer). "incremental": the recursive least-squares step
            M_n = M_{n-1} + (R_n - M_{n-1} K_n) (A_n^{-1} K_n)^T,   M = W - W_0,
        which satisfies M_n A_n = S_RK exactly when M_{n-1} A_{n-1} did (subtract
        M_{n-1} K K^T from both sides), needs only as many right-hand sides as the edit
        has requests, and is re-solved in full every `resolve_every` edits so rounding
        cannot drift. After a resume or a removal the next edit solves in full. A_n^{-1} K_n
        comes from one Cholesky factor of an earlier A and the keys added since
        (linalg.WoodburySolver), not from factoring A_n at every edit; A_n itself is built
        only for a fresh factor and for the logged condition number. It halves the solve at
        five layers (bench/RESULTS.md), but "full" stays the default: only it gives a
        resumed run the numbers of an unbroken one to the bit (the step's float64 M and
        factor live in memory, so a resume re-solves in full, equal only to rounding).
    fit="history" (reference): the sums hold each edit's own (K_n, R_n) as read above, and the
        weight is the ridge fit of every edit's first targets at once. "sequential": keys and
        residuals are read on the model as edited so far and the sums take
            R'_n = R_n + (W_{n-1} - W_0) K_n,
        the layer output the edit asks for, relative to W_0. Then M_n A_n = S_RK still holds
        and each step is M_n = M_{n-1} + R_n K_n^T A_n^{-1} (subtract M_{n-1} A_n from both
        sides): the update of sequential MEMIT/AlphaEdit with S_KK as the memory of earlier
        keys. Earlier edits keep the outputs they reached, where "history" re-fits them to
        their first targets whenever a later edit moves them; the weight stays the solve of
        two bounded sums, saved, resumed and removed as before (a removal then subtracts the
        edit's terms; the model is not the one edited without it). With d4s-alphaedit,
        values_on="current" and residual="per_layer" this is AlphaEdit's sequence exactly
        (a test checks it); values_on="original" keeps z on W_0, so values can be cached.
    keep_history=True: each edit's per-layer (K_n, R_n) are kept (float64, CPU; (d_in + d_out)
        x n numbers per layer), so `remove(edit_id)` subtracts exactly its terms and re-solves.
        False keeps only the requests and recomputes the terms on W_0 when removing: exact
        for edits made with values_on="original" and residual="once" (their terms never
        depend on other edits), an approximation otherwise (a warning says so).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...linalg import WoodburySolver, memit_system, solve_update
from ...linalg.solve import spd_solve
from ...models import EditableModel
from ...requests import EditRequest
from ..base import ConfigError, EditResult, MethodConfig, StateSize, register_method
from ..config import (
    ENGINEERING,
    MODEL_TABLE,
    PAPER,
    SWEEP,
    check_choice,
    check_positive,
    default_layers,
    sourced,
)
from .base import SystemMatrix
from .memit import MemitEditor, MemitLayersConfig

log = logging.getLogger(__name__)

Terms = dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (K (d_in, n), R (d_out, n))


@dataclass
class D4SHistoryConfig(MemitLayersConfig):
    """What D4S and d4s-alphaedit share: MEMIT's layer loop plus where edits are computed
    and whether history is kept.

    residual: "once" (reference) or "per_layer". values_on: "original" (reference) or
    "current". fit: "history" (reference) or "sequential". keep_history: keep each edit's
    terms for exact removal. solve: "full" or "incremental", with a full solve every
    `resolve_every` edits (see module docstring).
    """

    residual: str = sourced("once", PAPER)
    values_on: str = sourced("original", PAPER)
    fit: str = sourced("history", PAPER)
    keep_history: bool = sourced(True, "engineering: exact remove() (memory grows with the "
                                 "edits)")
    solve: str = sourced("full", ENGINEERING)
    resolve_every: int = sourced(100, ENGINEERING)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self, "values_on", ("original", "current"))
        check_choice(self, "fit", ("history", "sequential"))
        check_choice(self, "solve", ("full", "incremental"))
        check_positive(self, "resolve_every")
        if not isinstance(self.keep_history, bool):
            raise ConfigError(f"{type(self).__name__}.keep_history={self.keep_history!r}: "
                              f"give True or False")


@dataclass
class D4SConfig(D4SHistoryConfig):
    """D4S: the history fields plus MEMIT's lambda, which weighs C in its solve.

    mom2_update_weight: lambda (None: the model's d4s table entry, else MEMIT's; see
        memit.py; SmolLM2-135M: 5,000, its own row). 2,500 scores higher after 100 edits of
        counterfact-train (0.99 / 0.85 / 0.70 against 0.95 / 0.74 / 0.70) but moves the
        weights twice as far (layer 8's mean |W| +2.7% after 16 edits against +1.3%), and
        1,000 edits were not measured, so it is not the default (docs/results/defaults).
    context_prefixes: 0, target values on the bare prompt alone: one Adam optimisation a
        request instead of six (5 prefixes of 10 tokens, the locate family's default, which
        gave 0.88 efficacy after 100 edits where bare values give 0.97; docs/results/defaults).
    """

    mom2_update_weight: float | None = sourced(None, MODEL_TABLE)
    context_prefixes: int = sourced(0, SWEEP)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "mom2_update_weight", optional=True)


class D4SEditor(MemitEditor):
    """D4S: MEMIT's solve over running sums of all edits (S_RK, S_KK) on W_0, so an edit can
    be removed exactly and the state saved and resumed (module docstring)."""

    config_cls = D4SConfig
    config: D4SConfig

    def __init__(self, model: EditableModel, config: D4SConfig) -> None:
        super().__init__(model, config)
        self._s_rk: dict[int, torch.Tensor] = {}
        self._s_kk: dict[int, torch.Tensor] = {}
        self._history: dict[int, Terms] = {}  # edit id -> terms (keep_history)
        self._requests: dict[int, list[EditRequest]] = {}  # edit id -> requests (otherwise)
        self.live_edits: list[int] = []
        self.next_edit_id = 0
        self._solved: dict[int, torch.Tensor] = {}  # layer -> M = W_n - W_0 (incremental)
        # layer -> the factor of the last incremental step's system (incremental)
        self._factors: dict[int, WoodburySolver] = {}

    # -- the update rule ------------------------------------------------------------------------
    def solve_sums(self, layer: int, S_RK: torch.Tensor, S_KK: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """W_0 + S_RK (lambda C + S_KK)^{-1}, and that system matrix."""
        A = memit_system(self.covariance(layer), S_KK, self.mom2_weight(layer))
        W0 = self.original_weight(layer)
        return W0 + solve_update(S_RK, A, f"D4S system at layer {layer}"), A

    def incremental_system(self, layer: int, K: torch.Tensor, S_KK: torch.Tensor
                           ) -> tuple[SystemMatrix, torch.Tensor, torch.Tensor | None]:
        """(A_n, K', lift): the system after this edit (built when called) and the keys as
        they enter it, such that A_n = A_{n-1} + K' K'^T and M = S_RK' A_n^{-1} lift^T, in
        coordinates where `lift` (None: the identity) maps back to the layer's input space.

        A_n is a function: a Woodbury step never needs the d x d matrix, only a fresh factor
        and the logged condition number do (building it was ~15-30 ms per layer and edit).
        """
        return (lambda: memit_system(self.covariance(layer), S_KK, self.mom2_weight(layer)),
                K, None)

    def update_sums(self, layer: int, K: torch.Tensor, R: torch.Tensor, S_KK: torch.Tensor
                    ) -> tuple[torch.Tensor, SystemMatrix]:
        """W_0 + M_n by the recursive least-squares step (module docstring), and A_n: the
        layer's solver, which stands for it (else a function that builds it, see
        `incremental_system`)."""
        K = K.to(torch.float64)
        system, K_system, lift = self.incremental_system(layer, K, S_KK)
        X = self._step_solve(layer, system, K_system, S_KK)  # A_n^{-1} K'_n
        if lift is not None:
            X = lift @ X
        M = self._solved[layer]
        W_new = self.original_weight(layer) + M + (R.to(torch.float64) - M @ K) @ X.T
        return W_new, self._factors.get(layer, system)

    def _step_solve(self, layer: int, system: SystemMatrix, K_system: torch.Tensor,
                    S_KK: torch.Tensor) -> torch.Tensor:
        """A^{-1} K_system, where A = system() = A_{n-1} + K_system K_system^T.

        The layer's WoodburySolver stands for A_{n-1} when its token is the committed S_KK
        (checked by identity: a failed edit, a full solve, a removal or a resume commit
        another object, or none); then only the new keys are added. Otherwise A is built
        and factored afresh. Either way the solver now stands for this edit's S_KK.
        """
        solver = self._factors.get(layer)
        committed = self._s_kk.get(layer)
        if (solver is not None and committed is not None and solver.token is committed
                and solver.room(K_system.shape[1])):
            solver.add(K_system)
        else:
            A = system()
            solver = WoodburySolver.factor(A)
            if solver is None:  # not positive definite: spd_solve's eigen fallback and warning
                self._factors.pop(layer, None)
                return spd_solve(A, K_system, f"D4S system at layer {layer}")
        solver.token = S_KK
        self._factors[layer] = solver
        return solver.solve(K_system)

    def _incremental(self, layer: int) -> bool:
        return (self.config.solve == "incremental" and layer in self._solved
                and self.next_edit_id % self.config.resolve_every != 0)

    @property
    def values_independent_of_history(self) -> bool:  # type: ignore[override]
        # The target z is optimised on W_0 whatever the residual mode: "per_layer" re-reads
        # only the residual R (on the history's weights), not z, so z can be prepared ahead.
        return self.config.values_on == "original"

    def values_start(self) -> dict[int, torch.Tensor] | None:
        if self.config.values_on == "original":
            return {layer: self.original_weight(layer) for layer in self.layers}
        return None

    def _sums_with(self, layer: int, K: torch.Tensor, R: torch.Tensor, sign: float = 1.0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(S_RK + sign R K^T, S_KK + sign K K^T) of `layer`, as new tensors."""
        S_RK = sign * (R @ K.T)
        S_KK = sign * (K @ K.T)
        if layer in self._s_rk:
            S_RK, S_KK = self._s_rk[layer] + S_RK, self._s_kk[layer] + S_KK
        return S_RK, S_KK

    def compute(self, requests: Sequence[EditRequest]) -> EditResult:
        """One edit: its terms join the sums and each layer is solved from W_0 (in full, or by an
        incremental step); the sums are committed only when the edit succeeds."""
        sums: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        solved: dict[int, torch.Tensor] = {}
        start = self.values_start()
        sequential = self.config.fit == "sequential"
        if sequential:
            # z where values_on says (W_0: computed or read now, in its own session), keys
            # and residuals on the model as it is.
            if start is not None:
                self.prepare(requests)
            start = None
        corrected: dict[int, torch.Tensor] = {}

        def solve(j: int, layer: int, K: torch.Tensor, R: torch.Tensor):
            """Add this edit's keys and residuals to layer j's history sums and solve for its new weight."""
            if sequential:  # R' = R + (W_{n-1} - W_0) K: layer j is not written yet
                M = self.weight64(layer) - self.original_weight(layer)
                R = corrected[layer] = R.to(torch.float64) + M @ K.to(torch.float64)
            sums[layer] = self._sums_with(layer, K, R)
            if self._incremental(layer):
                W_new, A = self.update_sums(layer, K, R, sums[layer][1])
            else:
                W_new, A = self.solve_sums(layer, *sums[layer])
            solved[layer] = W_new
            return W_new, A

        result, terms = self.edit_layers(requests, solve, self.config.residual, start)
        terms = {layer: (K, corrected.get(layer, R)) for layer, (K, R) in terms.items()}
        # The sums change only once the whole edit succeeded.
        edit_id = self.next_edit_id
        for layer, (S_RK, S_KK) in sums.items():
            self._s_rk[layer], self._s_kk[layer] = S_RK, S_KK
        if self.config.solve == "incremental":
            self._solved = {layer: W - self.original_weight(layer) for layer, W in solved.items()}
        if self.config.keep_history:
            self._history[edit_id] = terms
        else:
            self._requests[edit_id] = list(requests)
        self.live_edits.append(edit_id)
        self.next_edit_id += 1
        result.info["edit_id"] = edit_id
        return result

    # -- removal ------------------------------------------------------------------------------
    def _recompute_terms(self, requests: Sequence[EditRequest]) -> Terms:
        """An edit's (K_j, R_j) again, on W_0 with residual once (call inside edit_session)."""
        c = self.config
        if (c.values_on, c.residual, c.fit) != ("original", "once", "history"):
            log.warning("d4s remove without history recomputes the edit on W_0 with residual "
                        "'once'; this run used values_on=%r, residual=%r, fit=%r, so the "
                        "removal is approximate (keep_history=True makes it exact)",
                        c.values_on, c.residual, c.fit)
        values = self.target(requests)
        return {layer: (K, R) for _j, layer, K, R in self.layer_terms(requests, values, "once")}

    def remove(self, edit_id: int) -> EditResult:
        """Deltas that take edit `edit_id` out: subtract its terms from the sums, re-solve."""
        if edit_id not in self.live_edits:
            raise ValueError(f"edit_id={edit_id} is not a live edit of this d4s editor; live: "
                             f"{self.live_edits}")
        result = EditResult()
        keep = self.config.keep_history
        sums = {}
        with self.edit_session(result, None if keep else
                               {layer: self.original_weight(layer) for layer in self.layers}) as new:
            if keep:
                terms = self._history[edit_id]
            else:
                with result.timed("values"):
                    terms = self._recompute_terms(self._requests[edit_id])
            for layer, (K, R) in terms.items():
                sums[layer] = self._sums_with(layer, K, R, sign=-1.0)
                with result.timed("solve"):
                    W_new, A = self.solve_sums(layer, *sums[layer])
                self.store_layer(result, new, layer, W_new, A)
        for layer, (S_RK, S_KK) in sums.items():
            self._s_rk[layer], self._s_kk[layer] = S_RK, S_KK
        self._history.pop(edit_id, None)
        self._requests.pop(edit_id, None)
        self.live_edits.remove(edit_id)
        self._solved.clear()  # the next edit solves in full
        self._factors.clear()
        result.info["removed_edit_id"] = edit_id
        return result

    # -- save / resume --------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Sums, C and W_0 per layer, per-edit terms if kept; config and edit ids in the manifest."""
        tensors, manifest = self.locate_state()
        for layer in self._s_rk:
            tensors[f"S_RK.{layer}"] = self._s_rk[layer]
            tensors[f"S_KK.{layer}"] = self._s_kk[layer]
        for edit_id, terms in self._history.items():
            for layer, (K, R) in terms.items():
                tensors[f"history.{edit_id}.{layer}.K"] = K
                tensors[f"history.{edit_id}.{layer}.R"] = R
        manifest.update(
            next_edit_id=self.next_edit_id, live_edits=list(self.live_edits),
            requests={str(e): [r.to_dict() for r in reqs] for e, reqs in self._requests.items()})
        return tensors, manifest

    def load_state_dict(self, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
        """Continue from `state_dict()`'s output: C, W_0, templates, the sums, the live edits and
        their kept terms (or requests); the next edit solves in full."""
        self.load_locate_state(tensors, manifest)
        self._s_rk = {layer: tensors[f"S_RK.{layer}"].to(torch.float64)
                      for layer in self.layers if f"S_RK.{layer}" in tensors}
        self._s_kk = {layer: tensors[f"S_KK.{layer}"].to(torch.float64)
                      for layer in self.layers if f"S_KK.{layer}" in tensors}
        self.next_edit_id = int(manifest["next_edit_id"])
        self.live_edits = [int(e) for e in manifest["live_edits"]]
        self._solved.clear()  # the next edit solves in full
        self._factors.clear()
        self._requests = {int(e): [EditRequest.from_dict(r) for r in reqs]
                          for e, reqs in manifest.get("requests", {}).items()}
        self._history = {}
        for edit_id in self.live_edits:
            if f"history.{edit_id}.{self.layers[0]}.K" in tensors:
                self._history[edit_id] = {
                    layer: (tensors[f"history.{edit_id}.{layer}.K"].to(torch.float64),
                            tensors[f"history.{edit_id}.{layer}.R"].to(torch.float64))
                    for layer in self.layers}


def history_state_size(model: EditableModel, config: MethodConfig) -> StateSize:
    """D4S's sums per edited layer: float64 S_RK (d_out x d_in) + S_KK and C (d_in x d_in
    each) + W_0 (d_out x d_in); the same whatever the number of edits."""
    layers = config.layers or default_layers(model, D4SEditor.layer_family)
    d_out, d_in = model.weight(0).shape
    return StateSize(8 * (2 * d_out * d_in + 2 * d_in * d_in), len(layers),
                     "S_RK, S_KK, C, W_0 in float64")


register_method("d4s", D4SConfig, D4SEditor,
                "sequential MEMIT over whole-history sums; removable edits (Huang et al. 2024)",
                state_size=history_state_size)
