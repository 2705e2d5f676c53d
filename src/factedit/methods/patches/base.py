"""Added FFN neurons: what T-Patcher and CaliNET share.

Both keep the model's weights and add neurons beside the MLP of some layers. A neuron is a
key k (d), a bias b and a value v (d); at every position the MLP's output gains

    relu(x . k + b) * v          (x: the MLP's input at that position)

summed over the live neurons of the layer. They act through forward hooks on the MLP
modules (an attachment, `models.attach`), position by position, so `generate` keeps its KV
cache and every caller sees the patched model. Each edit owns its neurons: `remove(edit_id)`
drops them and the model is exactly what it would be without that edit; the neurons are
saved as safetensors (`state_dict`).

The shared training (`PatchEditor.fit`) adds a new edit's neurons as trainable tensors and
runs Adam on the teacher-forced NLL of target_new at the edit prompt plus the method's own
terms (`extra_losses`), from the lowest patched layer up only (the blocks below are fixed,
their output is computed once), with the neurons of earlier edits live. A request leaves
the loss once its NLL is below `early_stop_nll`; training stops when all have and the extra
terms are zero.

"Memory" prompts are text the patch must leave alone: the requests' neighbourhood prompts,
a few general sentences of our own (`MEMORY_PROMPTS`) and, in a sequence, the prompts
(with their new targets) and neighbourhood prompts of the `memory_history` most recent live
edits. `queries` reads the MLP inputs at every position of such text. An edit's MLP inputs
are banked when it is made and reused by later edits instead of re-reading the text: for
T-Patcher (one patched layer, whose input no patch changes) that is exact; for CaliNET's
upper layer it is the input as it was before the later edits' lower slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...models import EditableModel, Trace, TraceDict, frozen, start_at_layer
from ...models.attach import Attachment
from ...models.scoring import TokenRows, mean_nll_per_row, token_rows
from ...requests import EditRequest
from ...text import pad_right
from ..base import ConfigError, Editor, EditResult, MethodConfig
from ..config import check_layer_list, check_positive

# General sentences (written for factedit) whose MLP inputs a patch should not fire on.
MEMORY_PROMPTS = (
    "The weather today is mild with a light breeze from the west.",
    "She opened the door and walked into the kitchen.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The committee will meet again next Tuesday to discuss the budget.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar.",
    "He learned to play the violin when he was seven years old.",
    "The capital of Japan is Tokyo.",
    "Most birds build nests in the spring.",
    "The train to the airport leaves every twenty minutes.",
    "A triangle has three sides and three angles.",
    "The novel was translated into more than forty languages.",
    "Prices rose sharply after the harvest failed.",
)


@dataclass
class PatchConfig(MethodConfig):
    """Fields shared by the neuron-adding editors.

    layers: layers whose MLP gets the neurons (None: the method's default).
    steps, lr: Adam steps and learning rate of a new edit's neurons.
    early_stop_nll: a request is done once its teacher-forced target NLL is below this.
    memory_neighbourhood: also treat each request's neighbourhood prompts as memory.
    memory_history: earlier live edits whose prompts and neighbourhood prompts are memory
        for a new edit (0: none). Without it a new patch is trained silent on 12 general
        sentences and its own neighbours only, and on zsRE (100 sequential edits) the patches
        fired on the other questions: locality 0.07, earlier edits overwritten.
    """

    layers: list[int] | None = None
    steps: int = 200
    lr: float = 0.05
    early_stop_nll: float = 0.05
    memory_neighbourhood: bool = True
    memory_history: int = 1000

    def __post_init__(self) -> None:
        check_layer_list(self)
        check_positive(self, "steps", "lr")
        if self.memory_history < 0:
            raise ConfigError(f"{type(self).__name__}.memory_history must be >= 0")
        if self.early_stop_nll < 0:
            raise ConfigError(f"{type(self).__name__}.early_stop_nll must be >= 0")


@dataclass
class Neurons:
    """The neurons one edit added at one layer: keys (n, d), bias (n,), values (n, d)."""

    edit_id: int
    layer: int
    keys: torch.Tensor
    bias: torch.Tensor
    values: torch.Tensor


def neuron_output(x: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor,
                  values: torch.Tensor) -> torch.Tensor:
    """sum_i relu(x . k_i + b_i) v_i at every position of x (..., d)."""
    return torch.relu(x @ keys.T.to(x.dtype) + bias.to(x.dtype)) @ values.to(x.dtype)


def separating_key(edit_queries: torch.Tensor, memory_queries: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """A neuron's starting key and bias (float32) that fire on the edit's MLP inputs and not
    on the memory's: the key along mean(q_e) - mean(q_m), scaled so the memory projections
    have unit spread; the bias halfway between the edit's lowest and the memory's highest
    projection."""
    q_e, q_m = edit_queries.float(), memory_queries.float()
    direction = q_e.mean(0) - q_m.mean(0)
    direction = direction / direction.norm().clamp_min(1e-12)
    key = direction / (q_m @ direction).std().clamp_min(1e-6)
    bias = -((q_e @ key).min() + (q_m @ key).max()) / 2
    return key, bias


def firing_rows(queries: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor,
                above: float = 0.0) -> torch.Tensor:
    """The rows of `queries` (N, d) where some neuron's pre-activation q . k + b exceeds
    `above`. A relu term over memory positions is zero, with zero gradient, on every other
    row, so it can be computed on these alone (exactly): the memory holds every earlier
    edit's positions and is mostly silent, and the dense term was most of a late edit's
    cost (CaliNET at 700 CounterFact edits: ~90k positions per layer and Adam step)."""
    with torch.no_grad():
        z = queries.to(keys.dtype) @ keys.T + bias
        return queries[(z > above).any(1)]


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else next(iter(kwargs.values()))


class PatchEditor(Editor):
    """Base of T-Patcher and CaliNET: neuron storage, the attachment, removal, saving, and
    the training loop. Subclasses set `default_layers`, and implement `init_neurons` (a new
    edit's starting neurons per layer) and optionally `extra_losses`."""

    config: PatchConfig
    # remove(i) drops edit i's neurons, but the later edits were trained with them present
    # (silent on the earlier edits' prompts, `memory_history`; CaliNET also seeds slots by
    # edit id), so the result is not the model edited without edit i.
    remove_exact = False

    def __init__(self, model: EditableModel, config: PatchConfig) -> None:
        super().__init__(model, config)
        name = f"{type(config).__name__}.layers"
        layers = config.layers if config.layers is not None else self.default_layers(model)
        self.layers = sorted(model.check_layer(layer, name) for layer in layers)
        self.neurons: list[Neurons] = []
        self.next_edit_id = 0
        # edit_id -> layer -> MLP inputs at every position of the edit's own texts (memory
        # for later edits; see the module docstring).
        self.memory_bank: dict[int, dict[int, torch.Tensor]] = {}
        self._live: dict[int, tuple[torch.Tensor, ...] | None] = {}

    def default_layers(self, model: EditableModel) -> list[int]:
        raise NotImplementedError

    def init_neurons(self, edit_queries: dict[int, torch.Tensor],
                     memory_queries: dict[int, torch.Tensor]
                     ) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """layer -> starting (keys, bias, values) of a new edit's neurons, from the MLP
        inputs where the edit must act (edit_queries) and where it must not (memory)."""
        raise NotImplementedError

    def extra_losses(self, params: dict[int, tuple[torch.Tensor, ...]],
                     edit_queries: dict[int, torch.Tensor],
                     memory_queries: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The method's own loss terms (each >= 0)."""
        return {}

    def lr_scales(self, neurons: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
                  ) -> tuple[float, float, float]:
        """Learning-rate multipliers of a new edit's (keys, bias, values) (default: 1)."""
        return (1.0, 1.0, 1.0)

    def extra_satisfied(self, extra: dict[str, float]) -> bool:
        """Whether the extra terms allow stopping (default: all exactly zero, as hinges are
        once their margins hold)."""
        return not any(extra.values())

    # -- MLP inputs -----------------------------------------------------------------------
    def queries(self, rows: TokenRows, positions: str) -> dict[int, torch.Tensor]:
        """layer -> MLP inputs (N, d) at the answer-predicting positions ("answer") or at
        every real position ("all") of `rows`, with the live patches acting."""
        model = self.model
        names = [model.arch.mlp_at(layer) for layer in self.layers]
        with torch.no_grad(), TraceDict(model.model, names, retain_input=True,
                                        stop=True) as traces:
            model.model.base_model(input_ids=rows.ids, attention_mask=rows.mask,
                                   use_cache=False)
        out = {}
        for layer, name in zip(self.layers, names):
            x = traces[name].input
            out[layer] = (x[rows.row, rows.pos] if positions == "answer"
                          else x[rows.mask.bool()]).detach()
        return out

    def memory_rows(self, texts: Sequence[str]) -> TokenRows:
        tok = self.model.tokenizer
        ids, mask = pad_right([tok(t)["input_ids"] for t in texts], tok.pad_token_id)
        empty = torch.zeros(0, dtype=torch.long, device=self.model.device)
        return TokenRows(torch.tensor(ids, device=self.model.device),
                         torch.tensor(mask, device=self.model.device), empty, empty, empty)

    # -- editing --------------------------------------------------------------------------
    def compute(self, requests: Sequence[EditRequest]) -> EditResult:
        """Add and train this edit's neurons (the target's NLL down, firing on the edit, silent
        on the memory prompts); returns no deltas, the neurons act through the attachment."""
        result = EditResult()
        rows = token_rows(self.model, [(r.rewrite_prompt, r.target_new) for r in requests])
        edit_queries = self.queries(rows, "answer")
        neighbours = [f"{prompt} {answer}" for r in requests for prompt, answer in r.neighborhood
                      if self.config.memory_neighbourhood]
        memory_rows = self.memory_rows(list(MEMORY_PROMPTS) + neighbours)
        memory_queries = self.queries(memory_rows, "all")
        own: dict[int, torch.Tensor] = {}
        if self.config.memory_history:
            # What later edits must leave alone: this edit's prompts with their new targets,
            # and its neighbours (the last positions: queries flattens row by row).
            n_neighbour = int(memory_rows.mask[len(MEMORY_PROMPTS):].sum())
            prompts = self.queries(self.memory_rows(
                [f"{r.rewrite_prompt} {r.target_new}" for r in requests]), "all")
            own = {layer: torch.cat([prompts[layer],
                                     memory_queries[layer][len(memory_queries[layer]) - n_neighbour:]])
                   for layer in self.layers}
            history = list(self.memory_bank.values())[-self.config.memory_history:]
            memory_queries = {layer: torch.cat([memory_queries[layer]] + [h[layer] for h in history])
                              for layer in self.layers}
        start = self.init_neurons(edit_queries, memory_queries)
        with result.timed("train"):
            params, nll, steps, extra = self.fit(rows, start, edit_queries, memory_queries)
        edit_id, self.next_edit_id = self.next_edit_id, self.next_edit_id + 1
        if self.config.memory_history:
            self.memory_bank[edit_id] = own
        for layer, (keys, bias, values) in params.items():
            self.neurons.append(Neurons(edit_id, layer, keys.detach().clone(),
                                        bias.detach().clone(), values.detach().clone()))
        self._live.clear()
        result.info.update(target_nll=nll.tolist(), steps=steps, extra_losses=extra,
                           neurons=sum(n.keys.shape[0] for n in self.neurons))
        return result

    def fit(self, rows: TokenRows,
            start: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
            edit_queries: dict[int, torch.Tensor], memory_queries: dict[int, torch.Tensor]
            ) -> tuple[dict[int, tuple[torch.Tensor, ...]], torch.Tensor, int, dict[str, float]]:
        """Adam on the new neurons (module docstring); returns (neurons, final NLL per
        request, steps taken, final extra loss terms)."""
        c, model = self.config, self.model
        lowest = self.layers[0]
        with torch.no_grad(), Trace(model.model, model.arch.layer(lowest), retain_input=True,
                                    stop=True) as block:
            model.model.base_model(input_ids=rows.ids, attention_mask=rows.mask,
                                   use_cache=False)
        block_in = block.input.clone()
        params = {layer: tuple(t.detach().clone().requires_grad_(True) for t in start[layer])
                  for layer in self.layers}
        optimiser = torch.optim.Adam(
            [{"params": [t], "lr": c.lr * scale}
             for p, scales in ((params[layer], self.lr_scales(start[layer]))
                               for layer in self.layers)
             for t, scale in zip(p, scales)], lr=c.lr)
        handles = []
        for layer in self.layers:
            def hook(_module, args, kwargs, out, layer=layer):
                return out + neuron_output(_first_input(args, kwargs), *params[layer])
            handles.append(model.module(model.arch.mlp_at(layer)).register_forward_hook(
                hook, with_kwargs=True))
        n = rows.n_rows
        nll = torch.full((n,), float("inf"))
        extra_values: dict[str, float] = {}
        steps = c.steps
        try:
            with frozen(model.model), torch.enable_grad():
                for step in range(c.steps + 1):
                    with start_at_layer(model.layers, lowest, block_in,
                                        model.block_returns_tuple):
                        hidden = model.model.base_model(
                            input_ids=rows.ids, attention_mask=rows.mask,
                            use_cache=False).last_hidden_state
                    per_request = mean_nll_per_row(model, hidden, rows.row, rows.pos,
                                                   rows.tok, n)
                    extra = self.extra_losses(params, edit_queries, memory_queries)
                    nll = per_request.detach().cpu()
                    extra_values = {k: float(v.detach()) for k, v in extra.items()}
                    open_requests = (nll >= c.early_stop_nll).to(per_request.device)
                    if not bool(open_requests.any()) and self.extra_satisfied(extra_values):
                        steps = step
                        break
                    if step == c.steps:
                        break
                    edit_loss = (per_request * open_requests).sum() / open_requests.sum().clamp_min(1)
                    loss = edit_loss + sum(extra.values(), torch.zeros((), device=model.device))
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
        finally:
            for handle in handles:
                handle.remove()
        return params, nll, steps, extra_values

    def remove(self, edit_id: int) -> EditResult:
        """Drop the edit's neurons (no deltas: weights untouched)."""
        if edit_id not in {n.edit_id for n in self.neurons}:
            raise KeyError(f"{type(self).__name__}.remove: no live edit with id {edit_id}")
        self.neurons = [n for n in self.neurons if n.edit_id != edit_id]
        self.memory_bank.pop(edit_id, None)
        self._live.clear()
        return EditResult(info={"neurons": sum(n.keys.shape[0] for n in self.neurons)})

    # -- the attachment -------------------------------------------------------------------
    def attachment(self) -> Attachment:
        """Forward hooks that add the live neurons' output to each patched layer's MLP output."""
        attachment = Attachment(self.model.model)
        for layer in self.layers:
            def hook(_module, args, kwargs, out, layer=layer):
                live = self._live_tensors(layer, out.device)
                if live is None:
                    return None
                return out + neuron_output(_first_input(args, kwargs), *live)
            attachment.add_forward_hook(self.model.module(self.model.arch.mlp_at(layer)), hook)
        return attachment

    def _live_tensors(self, layer: int, device: torch.device) -> tuple[torch.Tensor, ...] | None:
        if layer not in self._live:
            parts = [n for n in self.neurons if n.layer == layer]
            # Built outside inference mode: neurons cached while evaluating must still serve
            # the next edit's training forward, where a higher layer's input carries gradient.
            with torch.inference_mode(False):
                self._live[layer] = None if not parts else tuple(
                    torch.cat([getattr(n, f) for n in parts]).to(device)
                    for f in ("keys", "bias", "values"))
        return self._live[layer]

    # -- save / resume --------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, manifest): every edit's neurons and memory queries, and which edit and
        layer each belongs to."""
        tensors = {}
        for i, n in enumerate(self.neurons):
            tensors.update({f"{i}.keys": n.keys.cpu(), f"{i}.bias": n.bias.cpu(),
                            f"{i}.values": n.values.cpu()})
        for edit_id, by_layer in self.memory_bank.items():
            tensors.update({f"memory.{edit_id}.{layer}": q.cpu() for layer, q in by_layer.items()})
        manifest = {"patches": self.config.method, "layers": self.layers,
                    "next_edit_id": self.next_edit_id,
                    "entries": [[n.edit_id, n.layer] for n in self.neurons],
                    "memory_edits": list(self.memory_bank)}
        return tensors, manifest

    def load_state_dict(self, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
        """Continue from `state_dict()`'s output, refused where it holds another method's neurons
        or other layers."""
        if manifest.get("patches") != self.config.method or manifest.get("layers") != self.layers:
            raise ValueError(f"{type(self).__name__}: the saved state holds "
                             f"{manifest.get('patches')!r} neurons at layers "
                             f"{manifest.get('layers')!r}, not {self.config.method!r} at "
                             f"{self.layers}")
        device = self.model.device
        self.neurons = [Neurons(edit_id, layer, tensors[f"{i}.keys"].to(device),
                                tensors[f"{i}.bias"].to(device), tensors[f"{i}.values"].to(device))
                        for i, (edit_id, layer) in enumerate(manifest["entries"])]
        self.next_edit_id = manifest["next_edit_id"]
        self.memory_bank = {edit_id: {layer: tensors[f"memory.{edit_id}.{layer}"].to(device)
                                      for layer in self.layers}
                            for edit_id in manifest.get("memory_edits", [])}
        self._live.clear()
