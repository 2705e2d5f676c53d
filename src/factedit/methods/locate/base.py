"""The locate-then-edit family's shared config and plumbing (ROME, MEMIT, PMET, AlphaEdit, D4S).

`LocateEditConfig` holds the fields every member shares (layers, target-value optimisation,
covariance statistics, context templates) so no method re-declares them; `LocateEditor`
gives subclasses cached access to templates, covariance, keys, target values and null-space
projectors from `factedit.linalg`, the original weights W_0, and MEMIT's layer loop
(`edit_session` + `solve_layers`). A method file adds only its own update rule.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ...linalg import (
    LayerByLayerReads,
    TargetValues,
    WoodburySolver,
    compute_keys,
    condition_estimate,
    context_templates,
    covariance,
    null_space_basis,
    optimise_joint_target_values,
    optimise_target_values,
    preserved_factor,
    residual_to_mlp_output,
    site_module_name,
    spread_residual,
    weight_stats,
)
from ...linalg.covariance import PRECISIONS
from ...linalg.value_cache import ValueCache
from ...linalg.values import VALUE_RULES, value_batches, value_rule_options
from ...models import EditableModel, write_param
from ...requests import EditRequest
from ..base import ConfigError, Editor, EditResult, MethodConfig
from ..config import (
    ENGINEERING,
    MODEL_TABLE,
    PAPER,
    check_choice,
    check_layer_list,
    default_layers,
    sourced,
)

log = logging.getLogger(__name__)

@dataclass
class LocateEditConfig(MethodConfig):
    """Fields shared by the locate-then-edit family.

    layers: layers whose MLP output projection is edited (None: the model's default).
    v_steps, v_lr: Adam steps and learning rate of the target-value optimisation.
    v_weight_decay: penalty on ||delta|| / ||h||^2 (ROME's v_weight_decay).
    clamp_factor: ||delta|| <= clamp_factor * ||h|| (ROME 4, MEMIT 0.75).
    kl_factor: weight of the KL term that keeps "{subject} is a" predictions unchanged.
    early_stop_nll: stop optimising a request once its mean target NLL is below this.
    context_prefixes, context_length: number and token length of sampled prefixes.
    key_prefixes: number of sampled prefixes the keys k are averaged over (None: the same
        templates as the values). Keys cost one forward each, values an optimisation: this
        averages the keys over prefixed contexts while the values stay on the bare prompt
        (`context_prefixes=0`), and leaves cached values valid.
    key_columns: "mean" (MEMIT): one key per request, the mean over the key templates.
        "each": one column per key template, each with the request's residual and weight
        1/n_templates. S_RK is then the same as with the mean key, and S_KK gains each
        request's spread of keys across its contexts, sum_t (k_t - k_mean)(k_t - k_mean)^T / n:
        the update is asked to be flat across the contexts, so the edit reaches the bare
        prompt and the prefixed ones alike instead of only the mean key no prompt has.
        (Not for rome, whose rank-one update writes one key.)
    bare_key_weight: with key_columns="each", the bare prompt's column weight (the prefixed
        columns share the rest equally; None: 1/n_templates for every column). Above 1/n
        the solve holds the edit hardest where efficacy is scored.
    covariance_corpus: text file/folder for C; None samples text from the model itself.
    covariance_tokens, covariance_seq_len: token positions in C and the window length.
    covariance_precision: "float64" (every product) or "mixed" (each ~1k-token batch's
        product in float32, batches summed in float64: ~1.7x faster statistics on CPU).
    value_batch_size: requests per batched target-value optimisation, when values are
        computed ahead (`LocateEditor.prepare`) and within a larger edit batch.
    condition_every: log the condition number of the solved matrices on every k-th edit
        (1: all; 0: never; default every 10th, the first included). The estimate factors
        the system afresh: ~0.2 s per 1,536-wide layer on one CPU thread, more than the
        solve itself now that the solves keep their factors between edits (bench/RESULTS.md),
        so logging it on every edit would be the largest cost after the target values.
    value_cache: keep target values computed ahead (`prepare`) on disk and reuse them
        (`linalg.value_cache`: keyed by every weight of the model and every value option),
        so a resumed run or a sweep over lambda / solve settings skips the Adam steps.
    value_rule: "adam" (default): the target values as configured (v_steps Adam steps at
        v_lr). "fast": the same objective with Adam at lr 2.0 for at most 8 steps
        (`linalg.values.value_rule_options`; docs/results/cheaper-values: ~4.6x less CPU
        per value on the built-in model, 0.04 less specificity at 100 edits). Both run each
        step only from the subject's last token on, against the earlier positions' cached
        keys and values (the same values as whole rows, to rounding). Values cached under
        "adam" keep their cache keys.
    """

    layers: list[int] | None = sourced(None, MODEL_TABLE)
    v_steps: int = sourced(25, PAPER)
    v_lr: float = sourced(0.5, PAPER)
    v_weight_decay: float = sourced(0.5, PAPER)
    clamp_factor: float = sourced(4.0, PAPER)
    kl_factor: float = sourced(0.0625, PAPER)
    early_stop_nll: float = sourced(0.05, PAPER)
    context_prefixes: int = sourced(5, PAPER)
    context_length: int = sourced(10, PAPER)
    key_prefixes: int | None = sourced(None, PAPER)
    key_columns: str = sourced("mean", PAPER)
    bare_key_weight: float | None = sourced(None, PAPER)
    covariance_corpus: str | None = sourced(None, "engineering: no corpus ships with the "
                                            "library, so C is read from model-sampled text")
    covariance_tokens: int = sourced(100_000, "docs/results/covariance-tokens (ROME's "
                                     "scores equal from 2,500 to 20,000 sampled tokens, a "
                                     "MEMIT batch still moves past 5,000; 100,000 for margin)")
    covariance_seq_len: int = sourced(128, ENGINEERING)
    covariance_precision: str = sourced("float64", ENGINEERING)
    value_batch_size: int = sourced(16, ENGINEERING)
    condition_every: int = sourced(10, ENGINEERING)
    value_cache: bool = sourced(False, ENGINEERING)
    value_rule: str = sourced("adam", PAPER)
    seed: int = sourced(0, ENGINEERING)
    # `extra` (a dict no method read) was dropped; configs saved with it empty still load.
    retired_fields: ClassVar[dict[str, Any]] = {"extra": {}}

    def __post_init__(self) -> None:
        check_layer_list(self)
        for name in ("v_steps", "context_length", "covariance_tokens", "covariance_seq_len",
                     "value_batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("v_lr", "clamp_factor"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.key_prefixes is not None and self.key_prefixes < 0:
            raise ConfigError(f"key_prefixes must be >= 0 (or null: the values' "
                              f"context_prefixes), got {self.key_prefixes}")
        for name in ("kl_factor", "v_weight_decay", "early_stop_nll", "condition_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        check_choice(self, "covariance_precision", PRECISIONS)
        check_choice(self, "key_columns", KEY_COLUMNS)
        check_choice(self, "value_rule", VALUE_RULES)
        if self.bare_key_weight is not None:
            if self.key_columns != "each":
                raise ConfigError(f"{type(self).__name__}.bare_key_weight weighs one key column "
                                  f"among several: set key_columns=\"each\" too")
            if isinstance(self.bare_key_weight, bool) or not 0 < self.bare_key_weight <= 1:
                raise ConfigError(f"{type(self).__name__}.bare_key_weight="
                                  f"{self.bare_key_weight!r}: a weight in (0, 1]")
            key_prefixes = (self.context_prefixes if self.key_prefixes is None
                            else self.key_prefixes)
            if key_prefixes == 0:  # the keys' templates are the bare prompt alone
                raise ConfigError(f"{type(self).__name__}.bare_key_weight needs prefixed key "
                                  f"templates beside the bare prompt: set context_prefixes or "
                                  f"key_prefixes > 0")


RESIDUAL_MODES = ("per_layer", "once")
KEY_COLUMNS = ("mean", "each")


def _request_key(request: EditRequest) -> tuple:
    return (request.uid, request.prompt, request.subject, request.target_new)


# The SPD matrix an update solved against, a solver that stands for it, or a function that
# builds either: its condition number is logged every `condition_every` edits, and a step that
# never forms the matrix need not build it (linalg.condition_estimate takes both forms).
SystemMatrix = torch.Tensor | WoodburySolver | Callable[[], torch.Tensor | WoodburySolver]
# solve(j, layer, K, R) -> (W_new, A): layer l_j's new weight (d_out, d_in) and its system
# matrix. K (d_in, n), R (d_out, n).
LayerSolve = Callable[[int, int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, SystemMatrix]]


class LocateEditor(Editor):
    """Shared access to templates, covariance, keys, target values and W_0 for one model.

    MEMIT-style methods implement one layer's solve and call

        result, terms = self.edit_layers(requests, self.solve_layer, residual)

    which optimises z, runs MEMIT's layer loop on the model (`edit_session` + `solve_layers`)
    and turns the new weights into deltas, leaving the model as it found it.
    """

    config: LocateEditConfig
    layer_family: str = "memit"
    # Where the target z lives and how the residual is spread (MEMIT: residual stream, 1/(L-j)).
    value_site: str = "residual"
    spread_exponent: float = 1.0
    # The value cache's setting names this class; a subclass with the same value objective
    # names its parent here so the two share cached values.
    values_like: str | None = None

    def __init__(self, model: EditableModel, config: LocateEditConfig) -> None:
        super().__init__(model, config)
        self.layers = list(config.layers) if config.layers else default_layers(model, self.layer_family)
        for layer in self.layers:
            model.check_layer(layer, f"{type(config).__name__}.layers")
        spreads_mlp_output = self.value_site != "residual" and len(self.layers) > 1
        if spreads_mlp_output and model.arch.post_mlp_norm is not None:
            # PMET spreads an MLP-output change of its last layer to the MLP outputs of the
            # layers before; where each output is normalised before the residual (Gemma 2/3,
            # OLMo 2) their scales differ and that carry-over is not modelled (the residual
            # spread of memit, alphaedit and the d4s family is: residual_to_mlp_output).
            log.warning(
                "%s on %s: this model normalises each MLP's output before the residual "
                "(post_feedforward_layernorm), and this editor's spread of an MLP-output "
                "target over layers does not model that norm; the residual-site editors "
                "(memit, alphaedit, d4s, d4s-alphaedit) and rome do.",
                type(self).__name__, model.model_id)
        self._covariance: dict[int, torch.Tensor] = {}
        self._null_bases: dict[tuple[int, float], torch.Tensor] = {}
        # (layer, lambda) -> L with L L^T = lambda C (None: not positive definite)
        self._preserved_factors: dict[tuple[int, float], torch.Tensor | None] = {}
        # W_0 of the edited layers, taken at the first edit, in the parameter's own dtype:
        # the float64 cast at use is exact, and a bf16 model keeps a quarter of the memory.
        self._originals: dict[int, torch.Tensor] = {}
        # Kept on the editor (not only on the model) so a resumed editor reuses them exactly.
        self._templates: list[str] | None = None
        self._key_templates: list[str] | None = None
        # Target values computed ahead by `prepare`, one per request (see there).
        self._prepared: dict[tuple, TargetValues] = {}
        self._sessions = 0  # edits (and removals) computed: condition_every counts these

    def fresh(self) -> LocateEditor:
        """A history-free editor sharing this one's covariance, what is derived from it alone
        (null-space bases, factors of lambda C), templates and prepared values."""
        other = super().fresh()
        other._covariance, other._templates = self._covariance, self._templates
        other._null_bases, other._preserved_factors = self._null_bases, self._preserved_factors
        other._key_templates = self._key_templates
        other._prepared = self._prepared
        return other

    # -- cached statistics --------------------------------------------------------------------
    def templates(self) -> list[str]:
        if self._templates is None:
            c = self.config
            self._templates = context_templates(self.model, c.context_prefixes,
                                                c.context_length, c.seed)
        return self._templates

    def key_templates(self) -> list[str]:
        """The contexts the keys are averaged over: the values' unless `key_prefixes` is set."""
        c = self.config
        if c.key_prefixes is None:
            return self.templates()
        if self._key_templates is None:
            self._key_templates = context_templates(self.model, c.key_prefixes,
                                                    c.context_length, c.seed)
        return self._key_templates

    def covariance(self, layer: int) -> torch.Tensor:
        """C at `layer` (float64, CPU), computed once for all edited layers and cached."""
        if layer not in self._covariance:
            c = self.config
            missing = [x for x in self.layers if x not in self._covariance]
            self._covariance.update(covariance(
                self.model, sorted(set(missing) | {layer}), c.covariance_corpus,
                c.covariance_tokens, c.covariance_seq_len, precision=c.covariance_precision))
        return self._covariance[layer]

    def null_basis(self, layer: int, threshold: float) -> torch.Tensor:
        """AlphaEdit's null-space basis U of C at `layer` (float64, (d_in, m)), cached."""
        key = (layer, threshold)
        if key not in self._null_bases:
            self._null_bases[key] = null_space_basis(self.covariance(layer), threshold)
        return self._null_bases[key]

    def preserved_factor(self, layer: int, lam: float) -> torch.Tensor | None:
        """The Cholesky factor of lambda C at `layer` (None: not positive definite), cached."""
        key = (layer, lam)
        if key not in self._preserved_factors:
            self._preserved_factors[key] = preserved_factor(self.covariance(layer), lam)
        return self._preserved_factors[key]

    def keys(self, requests: Sequence[EditRequest], layers: Sequence[int],
             each: bool = False) -> dict[int, torch.Tensor]:
        return compute_keys(self.model, requests, layers, self.key_templates(), each=each)

    def _value_options(self) -> dict[str, Any]:
        c = self.config
        return value_rule_options(c.value_rule, dict(
            steps=c.v_steps, lr=c.v_lr, weight_decay=c.v_weight_decay,
            clamp_factor=c.clamp_factor, kl_factor=c.kl_factor,
            early_stop_nll=c.early_stop_nll))

    def target_values(self, requests: Sequence[EditRequest], layer: int, site: str) -> TargetValues:
        return optimise_target_values(self.model, requests, layer, site, self.templates(),
                                      **self._value_options())

    def joint_target_values(self, requests: Sequence[EditRequest], layer: int,
                            sites: Sequence[str]) -> dict[str, TargetValues]:
        return optimise_joint_target_values(self.model, requests, layer, sites,
                                            self.templates(), **self._value_options())

    def compute_target(self, requests: Sequence[EditRequest]) -> TargetValues:
        """z_i at the last edited layer (MEMIT): the value the layer loop writes towards."""
        return self.target_values(requests, self.layers[-1], self.value_site)

    def target(self, requests: Sequence[EditRequest]) -> TargetValues:
        """`compute_target`, or the values `prepare` computed ahead for these requests.

        An edit of more than `value_batch_size` requests is optimised that many at a time,
        as `prepare` does: one joint optimisation of a 1,024-request batch would hold the
        activations of all its rows for the backward pass at once (past 12 GB on the
        built-in model), and gives each request the same values only to rounding anyway.
        """
        keys = [_request_key(r) for r in requests]
        if keys and all(k in self._prepared for k in keys):
            return TargetValues.concat([self._prepared.pop(k) for k in keys])
        return TargetValues.in_request_order(
            (batch, self.compute_target([requests[i] for i in batch]))
            for batch in self._value_batches(requests, leave=False))

    def _value_batches(self, requests: Sequence[EditRequest], show: bool = True,
                       leave: bool = True) -> Iterator[list[int]]:
        """Indices of `requests` in batches of `value_batch_size` ordered by row length
        (`linalg.values.value_batches`), the unit every target-value optimisation uses
        (ahead or inside an edit), with a progress bar where there is more than one."""
        from tqdm.auto import tqdm

        batches = value_batches(self.model, requests, self.config.value_batch_size)
        yield from tqdm(batches, desc=f"{self.config.method} target values", unit="batch",
                        leave=leave, disable=not show or len(batches) < 2)

    # -- target values ahead of time ------------------------------------------------------------
    def values_start(self) -> dict[int, torch.Tensor] | None:
        """Weights of the edited layers that an edit's target values are computed on (None:
        the model as it is). D4S with values_on="original": W_0."""
        return None

    def prepare(self, requests: Sequence[EditRequest], progress: bool = False
                ) -> dict[str, float]:
        """Optimise the target values of `requests` now, `value_batch_size` at a time.

        Only valid where an edit's values do not depend on the edits before it: every edit of
        single mode starts from the same model, and D4S computes them on W_0. The protocol
        calls it in those cases (and only then); `compute` then takes each request's values
        from here (used once) instead of optimising them alone. The batched optimisation
        gives each request the same values as alone to rounding (see linalg.values) with one
        forward per step for the whole batch: on two CPU cores 2.2 s instead of 3.1 s per
        bare-prompt request, no gain with context prefixes (bench/RESULTS.md).
        """
        todo = list({_request_key(r): r for r in requests
                     if _request_key(r) not in self._prepared}.values())
        result = EditResult()  # its timings: C where computed here, then the values
        if not todo:
            return result.timings
        with self.edit_session(result, self.values_start(), is_edit=False), result.timed("values"):
            cache = self.value_cache() if self.config.value_cache else None

            def not_cached(pending: list[EditRequest]) -> list[EditRequest]:
                """Take the cached values of `pending` as prepared; return the rest."""
                if cache is None:
                    return pending
                found = cache.load_many(pending)
                for i, values in found.items():
                    self._prepared[_request_key(pending[i])] = values
                return [r for i, r in enumerate(pending) if i not in found]

            n_todo, todo = len(todo), not_cached(todo)
            if len(todo) < n_todo:
                log.info("%s: target values of %d requests read from %s",
                         self.config.method, n_todo - len(todo), cache.folder)
            for indices in self._value_batches(todo, show=progress):
                # Another process may have stored some since (bench/fill_values.py fills one
                # cache from the other end side by side): read them, compute the rest.
                batch = not_cached([todo[i] for i in indices])
                if not batch:
                    continue
                values = self.compute_target(batch)
                for request, one in zip(batch, values.split()):
                    self._prepared[_request_key(request)] = one
                    if cache is not None:
                        cache.save(request, one)
        return result.timings

    def value_cache(self) -> ValueCache:
        """The on-disk target values of this editor's setting, on the model as it is now
        (call inside the session that computes them: D4S computes on W_0)."""
        setting = {"class": self.values_like or type(self).__name__, "layer": self.layers[-1],
                   "site": self.value_site, "templates": self.templates(),
                   **self._value_options()}
        return ValueCache(self.model, setting)

    # -- weights --------------------------------------------------------------------------------
    def weight64(self, layer: int) -> torch.Tensor:
        """The edited matrix of `layer` as it is now: (d_out, d_in), float64, CPU."""
        # A copy even when the parameter is float64 on CPU already (`.to` would alias it).
        return self.model.weight(layer).detach().to("cpu", torch.float64, copy=True)

    def set_weight(self, layer: int, W: torch.Tensor) -> None:
        """Write a (d_out, d_in) matrix into the layer's parameter (Conv1D: transposed),
        wherever it lives (an offloaded one: into accelerate's store, see models.params)."""
        write_param(self.model.model, self.model.weight_name(layer),
                    self.as_param_delta(W, self.model.mlp_out(layer).weight))

    def original_weight(self, layer: int) -> torch.Tensor:
        """W_0 of `layer` (d_out, d_in), float64: the weight at this editor's first edit."""
        if layer not in self._originals:
            self._originals[layer] = self.model.weight(layer).detach().to("cpu").clone()
        return self._originals[layer].to(torch.float64)

    @contextmanager
    def edit_session(self, result: EditResult, start: dict[int, torch.Tensor] | None = None,
                     is_edit: bool = True) -> Iterator[dict[int, torch.Tensor]]:
        """Work on the model's edited layers and put them back afterwards, whatever happens.

        `start` (layer -> (d_out, d_in)) is written into the layers first (D4S computes on
        W_0). The body fills the yielded dict with new weights; on success each becomes
        `result.deltas[name] = W_new - W_entry`, with mean |W| and ||W - W_0||_F in
        `result.info["layers"][layer]`. `is_edit=False` (prepare) does not count towards
        `condition_every`.
        """
        self._sessions += int(is_edit)
        entry = {layer: self.weight64(layer) for layer in self.layers}
        for layer in self.layers:
            self.original_weight(layer)
        new: dict[int, torch.Tensor] = {}
        try:
            if any(layer not in self._covariance for layer in self.layers):
                # C belongs to the unedited model: compute it (or read its cache) on W_0.
                with result.timed("covariance"):
                    for layer in self.layers:
                        self.set_weight(layer, self.original_weight(layer))
                    self.covariance(self.layers[0])
                    for layer in self.layers:
                        self.set_weight(layer, entry[layer])
            with result.timed("context"):
                self.templates()
                self.key_templates()
            for layer, W in (start or {}).items():
                self.set_weight(layer, W)
            yield new
        finally:
            for layer in self.layers:
                self.set_weight(layer, entry[layer])
        stats = result.info.setdefault("layers", {})
        for layer, W in new.items():
            param = self.model.mlp_out(layer).weight
            result.deltas[self.weight_param_name(layer)] = self.as_param_delta(W - entry[layer], param)
            stats.setdefault(layer, {}).update(weight_stats(W, self.original_weight(layer)))

    # -- MEMIT's layer loop ---------------------------------------------------------------------
    def layer_terms(self, requests: Sequence[EditRequest], values: TargetValues,
                    residual: str = "per_layer") -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """Yield (j, l_j, K_j, R_j) for the edited layers in order; K (d_in, n), R (d_out, n).

        R_j = (z - h) / (L - j)**spread_exponent with h the current value at z's site.
        residual="per_layer" (MEMIT's own): K_j and h are read from the model when layer j is
        reached, so the caller sets l_{j-1}'s new weight before asking for the next item.
        residual="once" (D4S's reference): keys of every layer and h are read before the
        loop, all from the model as it was when z was optimised.
        """
        n_layers, z_layer = len(self.layers), self.layers[-1]
        each = self.config.key_columns == "each"
        once = self.keys(requests, self.layers, each) if residual == "once" else None
        reads = None if once is not None else LayerByLayerReads(
            self.model, requests, self.key_templates(), z_layer,
            site_module_name(self.model, z_layer, values.site))
        n_templates = len(self.key_templates())
        column_weights = self.key_column_weights(n_templates) if each else None
        for j, layer in enumerate(self.layers):
            if once is not None:
                K, h = once[layer], None
            else:
                K, h = reads.read(layer, with_site=j > 0, each=each)
            if h is None:
                h = values.init  # the model is still the one z was optimised on
            R = spread_residual(values.target, h, n_layers - j, self.spread_exponent)
            if each:  # every context's key carries its request's residual
                R = R.repeat_interleave(n_templates, dim=1)
            norm = self.model.post_mlp_norm(layer) if self.value_site == "residual" else None
            if norm is not None:  # the block adds norm(W k), not W k: write R through it
                R = residual_to_mlp_output(norm, self.weight64(layer) @ K.T.to(torch.float64), R)
            if each:  # weighted
                scale = column_weights.sqrt().repeat(len(requests))
                K, R = K * scale[:, None], R * scale
            yield j, layer, K.T, R

    def key_column_weights(self, n_templates: int) -> torch.Tensor:
        """(n_templates,) float64 weights of one request's key columns, bare prompt first,
        summing to 1 (key_columns="each")."""
        bare = self.config.bare_key_weight
        if bare is None:
            return torch.full((n_templates,), 1.0 / n_templates, dtype=torch.float64)
        rest = (1.0 - bare) / (n_templates - 1)
        return torch.tensor([bare] + [rest] * (n_templates - 1), dtype=torch.float64)

    def solve_layers(self, requests: Sequence[EditRequest], values: TargetValues,
                     solve: LayerSolve, result: EditResult, new: dict[int, torch.Tensor],
                     residual: str = "per_layer") -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The loop over the edited layers: solve each, write it for the layers after it.

        Fills `new` (layer -> W_new) and cond(A) into result.info["layers"]; returns each
        layer's (K_j, R_j) (D4S keeps them to remove the edit later).
        """
        terms = {}
        with result.timed("keys"):
            items = self.layer_terms(requests, values, residual)
            item = next(items)
        while item is not None:
            j, layer, K, R = item
            with result.timed("solve"):
                W_new, A = solve(j, layer, K, R)
            self.store_layer(result, new, layer, W_new, A)
            terms[layer] = (K, R)
            with result.timed("keys"):
                item = next(items, None)
        return terms

    def store_layer(self, result: EditResult, new: dict[int, torch.Tensor], layer: int,
                    W_new: torch.Tensor, A: SystemMatrix) -> None:
        """Write a solved layer into the model (for the layers after it) and the session."""
        every = self.config.condition_every
        if every and (self._sessions - 1) % every == 0:
            with result.timed("condition"):
                result.info.setdefault("layers", {}).setdefault(layer, {})["cond"] = (
                    condition_estimate(A() if callable(A) else A))
        self.set_weight(layer, W_new)
        new[layer] = W_new

    def edit_layers(self, requests: Sequence[EditRequest], solve: LayerSolve,
                    residual: str = "per_layer", start: dict[int, torch.Tensor] | None = None
                    ) -> tuple[EditResult, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
        """One MEMIT-style edit: z at the last layer, then the layer loop with `solve`.

        Returns the result (deltas, timings, info) and each layer's (K_j, R_j).
        """
        result = EditResult()
        with self.edit_session(result, start) as new:
            with result.timed("values"):
                values = self.target(requests)
            terms = self.solve_layers(requests, values, solve, result, new, residual)
        result.info.update(target_nll=values.final_nll, v_steps=values.steps,
                           target_delta_norm=values.delta.norm(dim=1).tolist())
        return result, terms

    # -- state shared by the stateful members (AlphaEdit, D4S) ----------------------------------
    def locate_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """C of every edited layer, W_0 and the templates: what an exact resume rests on."""
        tensors = {f"C.{layer}": self.covariance(layer) for layer in self.layers}
        tensors.update({f"W0.{layer}": w for layer, w in self._originals.items()})
        manifest = {"method": self.config.method, "config": self.config.to_dict(),
                    "layers": list(self.layers), "templates": self.templates(),
                    "key_templates": self.key_templates()}
        return tensors, manifest

    def load_locate_state(self, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
        """Take C, W_0 and the templates from a saved `locate_state` (refused where the saved
        layers differ from this editor's); what was derived from an older C is dropped."""
        if manifest.get("layers") != self.layers:
            raise ValueError(f"saved state edits layers {manifest.get('layers')}, this "
                             f"{type(self).__name__} edits {self.layers}: build it with the "
                             f"saved config")
        self._templates = list(manifest["templates"])
        # States saved before key_prefixes existed averaged the keys over the same templates.
        self._key_templates = list(manifest.get("key_templates", manifest["templates"]))
        # C is replaced: what was derived from the old one goes (new dicts, since fresh()
        # editors may share the old ones).
        self._null_bases, self._preserved_factors = {}, {}
        for layer in self.layers:
            self._covariance[layer] = tensors[f"C.{layer}"].to(torch.float64)
            if f"W0.{layer}" in tensors:
                self._originals[layer] = tensors[f"W0.{layer}"].clone()
