"""CaliNET (Dong et al., "Calibrating Factual Knowledge in Pretrained Language Models",
Findings of EMNLP 2022): FFN-like calibration memory slots beside the MLPs of the top
layers, trained on the facts to calibrate while the model stays frozen.

Each edit adds `slots` neurons (key, bias, value; `methods.patches`) to the MLP of every
layer in `layers` (default: the last two), output += relu(q . k + b) v. Values start at
zero. With `init="separating"` (default) the keys start around the direction that
separates the edit's MLP inputs from the memory's (T-Patcher's starting key plus noise),
each bias puts the edit above and the memory mostly below zero, and the keys' learning rate
is scaled to their size; `init="random"` is the plain start (random keys scaled to the MLP
input's size, zero biases, one learning rate), which fires on half of all positions and on
the built-in model left half of 100 CounterFact edits unlearned after 200 steps. Adam
minimises

    NLL(target_new | prompt) + memory_weight * mean over memory positions ||added output||^2

until every request's NLL is below early_stop_nll (or `steps` are done).

Departures: the paper trains one shared memory of fixed size on a calibration set that
includes facts the model already knows, which is what keeps the memory from moving them;
here each edit owns its slots (so an edit can be removed exactly and sequential editing
adds memory), and the memory-output penalty on the memory prompts stands in for that
calibration data. The memory inputs of the upper layer are read before the edit's own
slots below it are trained (an approximation the penalty tolerates).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...models import EditableModel
from ..base import ConfigError, register_method
from ..config import check_positive
from .base import PatchConfig, PatchEditor, firing_rows, neuron_output, separating_key

INITS = ("separating", "random")


@dataclass
class CaliNetConfig(PatchConfig):
    """CaliNET (layers, steps, lr, early_stop_nll: see PatchConfig; default layers: the last
    two). slots: neurons per edit and layer; memory_weight: the memory-output penalty;
    init: "separating" or "random" starting slots (module docstring)."""

    slots: int = 8
    memory_weight: float = 1.0
    init: str = "separating"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "slots")
        if self.init not in INITS:
            raise ConfigError(f"CaliNetConfig.init={self.init!r}: choose one of {INITS}")
        if self.memory_weight < 0:
            raise ConfigError("CaliNetConfig.memory_weight must be >= 0")


class CaliNetEditor(PatchEditor):
    """CaliNET: a block of calibration slots beside each patched MLP, started from keys that
    separate the edit from the memory prompts (or at random), trained on the edit."""

    config_cls = CaliNetConfig
    config: CaliNetConfig

    def default_layers(self, model: EditableModel) -> list[int]:
        return [model.num_layers - 2, model.num_layers - 1]

    def init_neurons(self, edit_queries, memory_queries):
        """Starting (keys, bias, values) of this edit's slots per layer, seeded by the edit
        number so a sequence of edits builds the same memory."""
        generator = torch.Generator().manual_seed(self.next_edit_id)
        start = {}
        for layer in self.layers:
            q_e, q_m = edit_queries[layer], memory_queries[layer]
            d, slots = q_m.shape[-1], self.config.slots
            noise = torch.randn(slots, d, generator=generator).to(q_m.device)
            if self.config.init == "random":
                scale = q_m.float().pow(2).mean().sqrt().clamp_min(1e-6) * d ** 0.5
                keys, bias = noise / scale, torch.zeros(slots, device=q_m.device)
            else:
                # Keys around the direction that separates the edit from the memory: a random
                # key fires on half of all positions, so the memory penalty and the edit loss
                # fight from step one (immediate efficacy 0.52 at N = 100). Each slot's
                # threshold lies halfway between the edit's lowest and the memory's highest
                # projection, but at least 0.5 (memory spread units) below the edit's lowest:
                # a slot silent on the edit gets no gradient and never learns.
                key, _ = separating_key(q_e, q_m)
                keys = key + noise * (0.5 * key.norm() / d ** 0.5)
                edit_low = (q_e.float() @ keys.T).amin(0)
                halfway = (edit_low + (q_m.float() @ keys.T).amax(0)) / 2
                bias = -torch.minimum(halfway, edit_low - 0.5)
            start[layer] = (keys.to(q_m.dtype), bias.to(q_m.dtype),
                            torch.zeros(slots, d, device=q_m.device, dtype=q_m.dtype))
        return start

    def lr_scales(self, neurons):
        """Adam rate multipliers for (keys, bias, values): keys move by about lr of their own size
        per step when they start from separating keys."""
        # Adam moves every entry by about lr per step, whatever its size; the starting keys'
        # entries are ~lr/25 on the built-in model, so at the plain lr a few steps replace a
        # separating key by noise and a slot goes silent on its edit. Keys move by about
        # lr of their own size per step instead.
        if self.config.init == "random":
            return (1.0, 1.0, 1.0)
        keys = neurons[0]
        return (float(keys.float().pow(2).mean().sqrt()), 1.0, 1.0)

    def extra_losses(self, params, edit_queries, memory_queries):
        penalty = torch.zeros((), device=self.model.device)
        for layer, neurons in params.items():
            memory = memory_queries[layer]
            added = neuron_output(firing_rows(memory, neurons[0], neurons[1]).to(
                neurons[0].dtype), *neurons)
            penalty = penalty + added.pow(2).sum() / max(len(memory), 1)
        return {"memory_output": self.config.memory_weight * penalty}

    def extra_satisfied(self, extra):
        return True  # a penalty, not a constraint: stop on the edit loss alone


register_method("calinet", CaliNetConfig, CaliNetEditor,
                "calibration memory slots beside the top MLPs, weights untouched (CaliNET)")
