"""UltraEdit (Gu et al. 2025, "UltraEdit: Training-, Subject-, and Memory-Free Lifelong
Editing in Large Language Models"): one gradient, a running normalisation, one ridge solve.

Per edit (a batch of n requests), with the edited projections W of `layers` (the MLP output
projections, or with `projections="in"` the MLP input projections, gate and up):

    1. one forward and one backward pass of the teacher-forced target NLL (mean over every
       target token of the batch); at every edited layer read, at each kept token position,
       the key k (the projection's input) and g = dLoss/d(output) (the gradient at the
       projection's output). Positions: `token="all"` every prompt and target position (the
       reference's "mask"), `token="target"` only those whose next token is a target token.
    2. lifelong normalisation: the projection's running mean and standard deviation over the
       [k, g] rows of every edit so far (this one included) give k^ and g^ (z-scores).
    3. the target shift of each row: v = -lr * ||k^||^2 * g^ (a normalised gradient step,
       MALMEN's pseudo value without the hypernetwork).
    4. the weight change solves the ridge least-squares problem min ||Delta K - V||^2 +
       ridge ||Delta||^2 over the rows' raw keys K (d_in, m) and shifts V (d_out, m):
           Delta = V K^T (K K^T + ridge I)^{-1}
       (an m x m system by Woodbury while m < d_in / 4: `linalg.keys_added_solve`).

There is no per-edit optimisation loop: an edit costs one forward and one backward pass and
a solve, whatever the settings. The running statistics are the method's only state
(`state_dict`): a resumed run normalises the next edit exactly as the unbroken one.

Departures from the reference (github.com/XiaojieGu/UltraEdit, and EasyEdit's copy):
- the edited matrices are by default the MLP output projections of `layers` (the engine's
  edit site); the reference edits the gate and up projections of the last layers (its configs
  name modules): `projections="in"` with late `layers` is that site;
- one running statistic per edited projection; the reference keeps one per weight shape, so
  its projections of one shape share a statistic;
- the statistics are float64 with Chan's update (`linalg.moments.RunningMoments`); the
  reference's float32 update adds n_b * unbiased batch variance (undefined for a one-row
  batch) and divides by n - 1 + eps;
- no chunking of rows into padded `editor_batch_size` blocks (the padding rows are dropped
  after normalising there, so the result is the same).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch

from ..linalg import keys_added_solve, memit_solve_is_low_rank, memit_system, solve_update
from ..linalg.moments import RunningMoments
from ..models import EditableModel, Trace, frozen
from ..requests import EditRequest
from ..text import pad_right, teacher_forced
from .base import Editor, EditResult, MethodConfig, StateSize, register_method
from .config import check_choice, check_layer_list, check_positive, default_layers

TOKENS = ("all", "target")
PROJECTIONS = ("out", "in")


@dataclass
class UltraEditConfig(MethodConfig):
    """UltraEdit's fields.

    layers: layers whose MLP projections are edited (None: the model's MEMIT layers).
    projections: "out", the MLP output projection (d_ff -> d_model) of each layer, or "in",
        its input projections (up, and gate where the MLP is gated: d_model -> d_ff), the
        reference's site.
    lr: the step size of the normalised gradient step, v = -lr ||k^||^2 g^ (the reference's
        `lr`, 1e-6 on 7B models whose gate/up keys are 4,096 wide; see the docs for the
        built-in model's value).
    ridge: the weight of ||Delta||^2 in the least-squares solve (the reference's identity).
    token: "all" (keys and gradients at every prompt and target position, the reference's
        "mask") or "target" (only where the next token is a target token).
    """

    layers: list[int] | None = field(default=None, metadata={
        "help": "layers whose MLP projections are edited (None: the model's MEMIT layers)"})
    projections: str = field(default="out", metadata={
        "help": "'out' the MLP output projection or 'in' its input projections (gate and up: "
                "the reference's site)"})
    lr: float = field(default=1e-4, metadata={
        "help": "step size of the normalised gradient step v = -lr * ||k^||^2 * g^"})
    ridge: float = field(default=1.0, metadata={
        "help": "weight of ||Delta||^2 in the least-squares solve (the reference's 1)"})
    token: str = field(default="all", metadata={
        "help": "'all' prompt and target positions (the reference's 'mask') or 'target'"})

    def __post_init__(self) -> None:
        check_layer_list(self)
        check_positive(self, "lr", "ridge")
        check_choice(self, "token", TOKENS)
        check_choice(self, "projections", PROJECTIONS)


class UltraEditEditor(Editor):
    """UltraEdit: keys and output gradients from one backward pass, normalised by running
    statistics, written by one ridge solve per layer (module docstring)."""

    config_cls = UltraEditConfig
    config: UltraEditConfig

    def __init__(self, model: EditableModel, config: UltraEditConfig) -> None:
        super().__init__(model, config)
        self.layers = (list(config.layers) if config.layers
                       else default_layers(model, "memit"))
        for layer in self.layers:
            model.check_layer(layer, "UltraEditConfig.layers")
        self.sites = edited_projections(model, self.layers, config.projections)
        # One running statistic per edited projection, by site label ("8", or "8.up_proj").
        self.moments: dict[str, RunningMoments] = {}
        self.edits = 0

    # -- one edit -----------------------------------------------------------------------------
    def key_gradients(self, requests: Sequence[EditRequest]
                      ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
        """site -> (K (m, d_in), G (m, d_out)) float64 at the kept positions, and the NLL.

        One forward and one backward pass over every request's teacher-forced row."""
        model, tok = self.model, self.model.tokenizer
        rows, first, answers = [], [], []
        for request in requests:
            ids, start, answer = teacher_forced(tok, request.rewrite_prompt, request.target_new)
            rows.append(ids)
            first.append(start)
            answers.append(answer)
        ids, mask = pad_right(rows, tok.pad_token_id)
        ids_t = torch.tensor(ids, device=model.device)
        mask_t = torch.tensor(mask, device=model.device)
        batch_index = torch.tensor([b for b, a in enumerate(answers) for _ in a])
        target_pos = torch.tensor([first[b] + j for b, a in enumerate(answers)
                                   for j in range(len(a))])
        targets = torch.tensor([t for a in answers for t in a], device=model.device)
        if self.config.token == "all":
            keep = mask_t.bool().cpu()
        else:
            keep = torch.zeros(ids_t.shape, dtype=torch.bool)
            keep[batch_index, target_pos] = True

        # A zero added to each projection's output: its gradient is dLoss/d(output), and the
        # weights need no gradient of their own.
        probes: dict[str, torch.Tensor] = {}

        def probe(site: str):
            def add_zero(output: torch.Tensor, _name: str) -> torch.Tensor:
                zero = torch.zeros_like(output, requires_grad=True)
                probes[site] = zero
                return output + zero
            return add_zero

        with torch.enable_grad(), frozen(model.model), ExitStack() as stack:
            traces = {site: stack.enter_context(Trace(model.model, name, retain_input=True,
                                                      edit_output=probe(site)))
                      for site, name in self.sites.items()}
            hidden = model.model.base_model(input_ids=ids_t, attention_mask=mask_t,
                                            use_cache=False).last_hidden_state
            logits = model.head_logits(hidden[batch_index.to(hidden.device),
                                              target_pos.to(hidden.device)])
            # At least float32 (a bf16 model's logits), a float64 model's own precision.
            loss = torch.nn.functional.cross_entropy(
                logits.to(torch.promote_types(logits.dtype, torch.float32)), targets)
            grads = torch.autograd.grad(loss, [probes[site] for site in self.sites])
        out = {}
        for site, grad in zip(self.sites, grads):
            keys = traces[site].input
            out[site] = (keys[keep.to(keys.device)].to(torch.float64).cpu(),
                         grad[keep.to(grad.device)].to(torch.float64).cpu())
        return out, float(loss.detach())

    def site_delta(self, site: str, K: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        """Delta (d_out, d_in) of the projection at `site` from the rows' keys K and gradients
        G; updates its running statistics with them first (this edit is part of its own norm)."""
        d_in = K.shape[1]
        moments = self.moments.setdefault(site, RunningMoments(d_in + G.shape[1]))
        rows = torch.cat([K, G], dim=1)
        moments.update(rows)
        k_hat, g_hat = moments.normalise(rows).split([d_in, G.shape[1]], dim=1)
        V = -self.config.lr * k_hat.square().sum(1, keepdim=True) * g_hat   # (m, d_out)
        keys, shifts = K.T, V.T                                             # (d_in, m), (d_out, m)
        ridge = self.config.ridge
        if memit_solve_is_low_rank(keys):
            # (ridge I + K K^T)^{-1} K = Y (I + K^T Y)^{-1} with Y = K / ridge.
            return shifts @ keys_added_solve(keys / ridge, keys).T
        eye = torch.eye(d_in, dtype=torch.float64)
        return solve_update(shifts @ keys.T, memit_system(eye, keys @ keys.T, ridge),
                            f"UltraEdit system at {self.sites[site]}")

    def compute(self, requests: Sequence[EditRequest]) -> EditResult:
        """Deltas for `requests` from one backward pass and one solve per layer."""
        result = EditResult()
        with result.timed("gradients"):
            reads, nll = self.key_gradients(requests)
        before = {site: RunningMoments.load(m.state()) for site, m in self.moments.items()}
        try:
            with result.timed("solve"):
                for site, name in self.sites.items():
                    K, G = reads[site]
                    delta = self.site_delta(site, K, G)
                    param = self.model.module(name).weight
                    result.deltas[f"{name}.weight"] = self.as_param_delta(delta, param)
                    result.info.setdefault("layers", {})[site] = {
                        "rows": K.shape[0], "delta_norm": float(delta.norm())}
        except Exception:
            # A failed edit leaves the statistics as they were.
            self.moments = before
            raise
        self.edits += 1
        result.info.update(target_nll=nll, backward_passes=1)
        return result

    # -- save / resume ------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"{name}.{site}": value for site, m in self.moments.items()
                   for name, value in m.state().items()}
        manifest = {"ultraedit": True, "layers": list(self.layers), "edits": self.edits,
                    "config": self.config.to_dict()}
        return tensors, manifest

    def load_state_dict(self, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
        """Continue from `state_dict()`: the running normalisation statistics of every
        edited projection."""
        saved = manifest.get("config", {}).get("projections", "out")
        if (not manifest.get("ultraedit") or manifest.get("layers") != self.layers
                or saved != self.config.projections):
            raise ValueError(f"UltraEditEditor: the saved state is not UltraEdit statistics of "
                             f"layers {self.layers}, projections {self.config.projections!r} "
                             f"(saved: layers {manifest.get('layers')!r}, projections "
                             f"{saved!r}); build the editor with the saved config")
        self.moments = {site: RunningMoments.load({name: tensors[f"{name}.{site}"]
                                                   for name in ("count", "mean", "m2")})
                        for site in self.sites if f"mean.{site}" in tensors}
        self.edits = int(manifest.get("edits", 0))


def edited_projections(model: EditableModel, layers: Sequence[int], projections: str
                       ) -> dict[str, str]:
    """Site label -> module name of every projection UltraEdit edits: "8" -> layer 8's MLP
    output projection ("out"), or "8.up_proj", "8.gate_proj" -> its input projections ("in")."""
    if projections == "out":
        return {str(layer): model.arch.mlp_out_at(layer) for layer in layers}
    return {f"{layer}.{name.rsplit('.', 1)[-1]}": name
            for layer in layers for name in model.arch.mlp_in_at(layer)}


def ultraedit_state_size(model: EditableModel, config: MethodConfig) -> StateSize:
    """Two float64 vectors (mean, M2) of d_in + d_out per edited projection (an MLP input
    projection has the output projection's two sizes, swapped)."""
    assert isinstance(config, UltraEditConfig)
    layers = list(config.layers) if config.layers else default_layers(model, "memit")
    d_out, d_in = model.weight_shape(layers[0])
    per_layer = len(edited_projections(model, layers[:1], config.projections))
    return StateSize(per_layer=per_layer * 2 * 8 * (d_in + d_out), layers=len(layers),
                     parts="running mean and squared deviations of [key, gradient] rows")


register_method("ultraedit", UltraEditConfig, UltraEditEditor,
                "one gradient, lifelong-normalised, one ridge solve per layer (UltraEdit)",
                state_size=ultraedit_state_size)
