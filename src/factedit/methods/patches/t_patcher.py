"""T-Patcher (Huang et al., "Transformer-Patcher: One Mistake Worth One Neuron", ICLR 2023):
one neuron added to the last MLP per edit, trained to fire on the edit and nowhere else.

The neuron (key k, bias b, value v; `methods.patches`) reads the MLP input q at each
position: z = q . k + b, output += relu(z) v. With q_e the MLP inputs at the positions
that predict target_new's tokens and q_m those at every position of the memory prompts,
training minimises

    NLL(target_new | prompt)                                  (edit loss)
    + activation_weight * mean relu(margin - z(q_e))          (fire on the edit)
    + memory_weight     * mean relu(z(q_m) + margin)          (stay silent elsewhere)

and stops once every request's NLL is below early_stop_nll and both hinges are zero.
Initialisation: k along mean(q_e) - mean(q_m), scaled so the memory projections have unit
spread, b halfway between the edit's lowest and the memory's highest projection, v = 0.

Departures: the paper's activation and memory losses use an exponential margin loss and
add a second memory term (the edit's activation above every memory activation by a gap);
here both are hinges with one `margin`, which the second term then implies. The memory set
is the requests' neighbourhood prompts, `patches.MEMORY_PROMPTS` and the texts of earlier
live edits (`memory_history`, ours: so a later patch does not fire on an earlier edit's
prompt and overwrite it). The paper samples its memory set from the training data. The neuron is ReLU whatever the MLP's own activation is, so it is
exactly zero wherever it does not fire.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...models import EditableModel
from ..base import register_method
from ..config import check_positive
from .base import PatchConfig, PatchEditor, firing_rows, separating_key


@dataclass
class TPatcherConfig(PatchConfig):
    """T-Patcher (layers, steps, lr, early_stop_nll: see PatchConfig; default layer: the
    last). margin: the hinge margin in pre-activation units; activation_weight and
    memory_weight: the weights of the two hinge terms."""

    margin: float = 1.0
    activation_weight: float = 1.0
    memory_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "margin", "activation_weight", "memory_weight")


class TPatcherEditor(PatchEditor):
    """T-Patcher: one neuron per edit in each patched layer's MLP (default: the last layer),
    trained to fire on the edit and stay below a margin on the memory prompts."""

    config_cls = TPatcherConfig
    config: TPatcherConfig

    def default_layers(self, model: EditableModel) -> list[int]:
        return [model.num_layers - 1]

    def init_neurons(self, edit_queries, memory_queries):
        start = {}
        for layer in self.layers:
            key, bias = separating_key(edit_queries[layer], memory_queries[layer])
            dtype = edit_queries[layer].dtype
            start[layer] = (key[None].to(dtype), bias.reshape(1).to(dtype),
                            torch.zeros_like(key)[None].to(dtype))
        return start

    def extra_losses(self, params, edit_queries, memory_queries):
        """T-Patcher's activation and memory losses: the patch fires above the margin on the
        edit and below minus the margin on the memory queries it would fire on."""
        c = self.config
        activation = memory = torch.zeros((), device=self.model.device)
        for layer, (keys, bias, _values) in params.items():
            z_edit = edit_queries[layer].to(keys.dtype) @ keys.T + bias
            queries = memory_queries[layer]
            firing = firing_rows(queries, keys, bias, above=-c.margin)
            z_memory = firing.to(keys.dtype) @ keys.T + bias
            activation = activation + torch.relu(c.margin - z_edit).mean()
            memory = memory + torch.relu(z_memory + c.margin).sum() / max(
                queries.shape[0] * keys.shape[0], 1)
        return {"activation": c.activation_weight * activation, "memory": c.memory_weight * memory}


register_method("t-patcher", TPatcherConfig, TPatcherEditor,
                "one trained neuron per edit in the last MLP, weights untouched (T-Patcher)")
