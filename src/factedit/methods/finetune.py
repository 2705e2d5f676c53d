"""Fine-tuning baselines: FT-L and FT-M (one layer's MLP output weights, Adam on the edit).

Both train only the MLP output projection of `layers` (default: the model's ROME layer) on
the edit prompts, with every other parameter frozen, and return W_trained - W as the delta.
They differ in the loss and the constraint:

    ft-l  (EasyEdit's FT-L, after the ROME paper's FT+L baseline)
          objective "prompt_last": at the prompt's last position, the mean over the target's
          tokens of -log P(token): EasyEdit's objective, which scores every target token at
          that one position. Each step ends by clamping W to W_0 +- norm_constraint
          (the L-infinity ball of ROME's FT+L).
    ft-m  (EasyEdit's FT-M, "fine-tuning with masking")
          objective "target": prompt + target teacher-forced, the loss masked to the target
          tokens (the prompt's tokens carry no loss). No norm constraint.

`objective="all"` (the plain LM loss over prompt and target) is available to either. A
request stops contributing once its target NLL (teacher forced) is below `early_stop_nll`;
the whole edit stops when every request has.

Cost: the blocks below the first trained layer never change, so their output is computed
once and fed in with `start_at_layer`; the LM head runs only where the loss needs it; no
gradient reaches any weight except the trained ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..models import EditableModel, Trace, frozen, onloaded, start_at_layer
from ..models.scoring import TokenRows, mean_nll_per_row, token_rows
from ..requests import EditRequest
from .base import ConfigError, Editor, EditResult, MethodConfig, register_method
from .config import (
    MODEL_TABLE,
    PAPER,
    SWEEP,
    check_choice,
    check_layer_list,
    check_positive,
    default_layers,
    sourced,
)

OBJECTIVES = ("prompt_last", "target", "all")


@dataclass
class FineTuneConfig(MethodConfig):
    """Fields of ft-l and ft-m (defaults below are ft-l's; FtMConfig changes them).

    layers: layers whose MLP output weight is trained (None: the model's ROME layer).
    steps, lr: Adam steps and learning rate (EasyEdit: 25 and 5e-4, which ft-m keeps; ft-l's
        lr 1e-3 and radius 1e-2 come from a sweep on counterfact-train, docs/results/defaults).
    objective: "prompt_last" | "target" | "all" (module docstring).
    norm_constraint: L-infinity radius around W_0 after every step (None: unconstrained).
    early_stop_nll: a request is done once its teacher-forced target NLL is below this.
    """

    layers: list[int] | None = sourced(None, MODEL_TABLE)
    steps: int = sourced(25, PAPER)
    lr: float = sourced(1e-3, SWEEP)
    objective: str = sourced("prompt_last", PAPER)
    norm_constraint: float | None = sourced(1e-2, SWEEP)
    early_stop_nll: float = sourced(0.05, PAPER)

    def __post_init__(self) -> None:
        check_layer_list(self)
        check_positive(self, "steps", "lr")
        check_positive(self, "norm_constraint", optional=True)
        check_choice(self, "objective", OBJECTIVES)
        if self.early_stop_nll < 0:
            raise ConfigError(f"{type(self).__name__}.early_stop_nll must be >= 0")


@dataclass
class FtMConfig(FineTuneConfig):
    # lr 1e-3 edited as well and faster but cost 0.10 locality (docs/results/defaults)
    lr: float = sourced(5e-4, PAPER)
    objective: str = sourced("target", PAPER)
    norm_constraint: float | None = sourced(None, PAPER)


class FineTuneEditor(Editor):
    """ft-l / ft-m: Adam on the MLP output projections of `layers`, everything else frozen;
    the change is returned as deltas and the weights are put back."""

    config: FineTuneConfig

    def __init__(self, model: EditableModel, config: FineTuneConfig) -> None:
        super().__init__(model, config)
        self.layers = sorted(config.layers) if config.layers else default_layers(model, "rome")
        for layer in self.layers:
            model.check_layer(layer, f"{type(config).__name__}.layers")

    def _loss_tokens(self, rows: TokenRows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row, position, token) of every term of the objective's loss."""
        if self.config.objective == "target":
            return rows.row, rows.pos, rows.tok
        if self.config.objective == "prompt_last":
            # Every target token scored at the prompt's last position (that of the first).
            first = torch.ones_like(rows.row, dtype=torch.bool)
            first[1:] = rows.row[1:] != rows.row[:-1]
            last_prompt = rows.pos[first][rows.row]
            return rows.row, last_prompt, rows.tok
        # "all": every next-token prediction of the prompt and the target.
        lengths = rows.mask.sum(1)
        row = torch.repeat_interleave(torch.arange(rows.n_rows, device=lengths.device), lengths)
        pos = torch.cat([torch.arange(int(n), device=lengths.device) for n in lengths])
        next_ids = torch.cat([rows.ids[:, 1:], rows.ids[:, :1]], dim=1)
        tok = next_ids[row, pos]
        # The last input position predicts the target's last token, which is not an input.
        is_last = pos == lengths[row] - 1
        last_of_row = torch.zeros(rows.n_rows, dtype=rows.tok.dtype, device=lengths.device)
        last_of_row[rows.row] = rows.tok  # written in order: the last write is the last token
        tok = torch.where(is_last, last_of_row[row], tok)
        return row, pos, tok

    def compute(self, requests: Sequence[EditRequest]) -> EditResult:
        """Fine-tune on the requests' (edit prompt, target_new) rows and return the weight
        change; the blocks below the first tuned layer run once, their output fed in."""
        model = self.model
        result = EditResult()
        batch = token_rows(model, [(r.rewrite_prompt, r.target_new) for r in requests])
        n = len(requests)
        first = self.layers[0]
        with torch.inference_mode(), Trace(model.model, model.arch.layer(first),
                                           retain_input=True, stop=True) as block_in:
            model.model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False)
        hidden_in = block_in.input.clone()  # outside inference mode: an ordinary tensor
        names = [self.weight_param_name(layer) for layer in self.layers]
        # Offloaded weights become ordinary parameters for the training loop (Adam must hold
        # the same objects across steps); the weights are put back below, so no write-back.
        with onloaded(model.model, names, write_back=False) as live, frozen(model.model):
            params = [live[name] for name in names]
            originals = [p.detach().clone() for p in params]
            for p in params:
                p.requires_grad_(True)
            try:
                nll, steps_taken = self._train(result, batch, params, originals, hidden_in, n)
                for name, p, w0 in zip(names, params, originals):
                    result.deltas[name] = (p.detach() - w0).clone()
            finally:
                with torch.no_grad():
                    for p, w0 in zip(params, originals):
                        p.copy_(w0)
        result.info.update(target_nll=nll.tolist(), steps=steps_taken, layers=list(self.layers))
        return result

    def _train(self, result: EditResult, batch: TokenRows,
               params: list[torch.Tensor], originals: list[torch.Tensor],
               hidden_in: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
        """Adam on `params` until every request's target NLL is below the threshold (or the
        step budget ends); returns the last NLL per request and the steps taken."""
        c, model = self.config, self.model
        optimiser = torch.optim.Adam(params, lr=c.lr)
        base = model.model.base_model
        per_request = torch.zeros(n, device=model.device)
        nll = torch.full((n,), float("inf"))
        loss_tokens = self._loss_tokens(batch)
        steps_taken = c.steps
        with result.timed("train"):
            for step in range(c.steps):
                with start_at_layer(model.layers, self.layers[0], hidden_in,
                                    model.block_returns_tuple):
                    hidden = base(input_ids=batch.ids, attention_mask=batch.mask,
                                  use_cache=False).last_hidden_state
                nll = mean_nll_per_row(model, hidden, batch.row, batch.pos, batch.tok,
                                       n).detach().cpu()
                if bool((nll < c.early_stop_nll).all()):
                    steps_taken = step
                    break
                open_requests = (nll >= c.early_stop_nll).to(per_request.device)
                per_request = mean_nll_per_row(model, hidden, *loss_tokens, n)
                loss = (per_request * open_requests).sum() / open_requests.sum()
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                if c.norm_constraint is not None:
                    with torch.no_grad():
                        for p, w0 in zip(params, originals):
                            p.copy_(torch.clamp(p, w0 - c.norm_constraint,
                                                w0 + c.norm_constraint))
        return nll, steps_taken


register_method("ft-l", FineTuneConfig, FineTuneEditor,
                "fine-tune one MLP layer, L-infinity constrained (EasyEdit FT-L / ROME FT+L)")
register_method("ft-m", FtMConfig, FineTuneEditor,
                "fine-tune one MLP layer, loss masked to the target tokens (EasyEdit FT-M)")
