"""CaliNET (Dong et al., "Calibrating Factual Knowledge in Pretrained Language Models",
Findings of EMNLP 2022): FFN-like calibration memory slots beside the MLPs of the top
layers, trained on the facts to calibrate while the model stays frozen.

Each edit adds `slots` neurons (key, bias, value; `methods.patches`) to the MLP of every
layer in `layers` (default: the last two), output += relu(q . k + b) v. Keys start random
(scaled to the MLP input's size), biases and values at zero, and Adam minimises

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

from ..models import EditableModel
from .base import ConfigError, register_method
from .locate import check_positive
from .patches import PatchConfig, PatchEditor, neuron_output


@dataclass
class CaliNetConfig(PatchConfig):
    """CaliNET (layers, steps, lr, early_stop_nll: see PatchConfig; default layers: the last
    two). slots: neurons per edit and layer; memory_weight: the memory-output penalty."""

    slots: int = 8
    memory_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "slots")
        if self.memory_weight < 0:
            raise ConfigError("CaliNetConfig.memory_weight must be >= 0")


class CaliNetEditor(PatchEditor):
    config_cls = CaliNetConfig
    config: CaliNetConfig

    def default_layers(self, model: EditableModel) -> list[int]:
        return [model.num_layers - 2, model.num_layers - 1]

    def init_neurons(self, edit_queries, memory_queries):
        # Seeded by the edit number: the same sequence of edits builds the same memory.
        generator = torch.Generator().manual_seed(self.next_edit_id)
        start = {}
        for layer in self.layers:
            q = memory_queries[layer]
            d = q.shape[-1]
            scale = q.float().pow(2).mean().sqrt().clamp_min(1e-6) * d ** 0.5
            keys = (torch.randn(self.config.slots, d, generator=generator) / scale)
            keys = keys.to(device=q.device, dtype=q.dtype)
            start[layer] = (keys, torch.zeros(self.config.slots, device=q.device, dtype=q.dtype),
                            torch.zeros(self.config.slots, d, device=q.device, dtype=q.dtype))
        return start

    def extra_losses(self, params, edit_queries, memory_queries):
        penalty = torch.zeros((), device=self.model.device)
        for layer, neurons in params.items():
            added = neuron_output(memory_queries[layer].to(neurons[0].dtype), *neurons)
            penalty = penalty + added.pow(2).sum(-1).mean()
        return {"memory_output": self.config.memory_weight * penalty}

    def extra_satisfied(self, extra):
        return True  # a penalty, not a constraint: stop on the edit loss alone


register_method("calinet", CaliNetConfig, CaliNetEditor,
                "calibration memory slots beside the top MLPs, weights untouched (CaliNET)")
