"""The locate-then-edit family's shared config and plumbing (ROME, MEMIT, PMET, AlphaEdit, D4S).

`LocateEditConfig` holds the fields every member shares (layers, target-value optimisation,
covariance statistics, context templates) so no method re-declares them; `LocateEditor`
gives subclasses cached access to templates, covariance, keys and target values from
`factedit.linalg`. A method file adds only its own update rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..linalg import (
    TargetValues,
    compute_keys,
    context_templates,
    covariance,
    optimise_target_values,
)
from ..models import EditableModel
from ..requests import EditRequest
from .base import ConfigError, Editor, MethodConfig

# Layers chosen per model shape (model_type, n_layers, d_model). How they were chosen is
# recorded in bench/RESULTS.md ("layer sweep"). Other models get a depth-fraction default.
MODEL_DEFAULTS: dict[tuple[str, int, int], dict[str, dict]] = {
    # SmolLM2-135M
    ("llama", 30, 576): {
        "rome": {"layers": [6]},
        "memit": {"layers": [4, 5, 6, 7, 8]},
    },
}


def default_layers(model: EditableModel, family: str) -> list[int]:
    cfg = model.model.config
    key = (cfg.model_type, model.num_layers, getattr(cfg, "hidden_size", 0))
    table = MODEL_DEFAULTS.get(key, {})
    if family in table:
        return list(table[family]["layers"])
    # ROME's GPT-2 XL layer 17/48 and MEMIT's 13-17 sit at roughly a third of the depth.
    centre = max(1, round(model.num_layers * 0.2))
    if family == "rome":
        return [centre]
    return [max(0, centre - 2 + i) for i in range(5) if centre - 2 + i < model.num_layers]


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
    covariance_corpus: text file/folder for C; None samples text from the model itself.
    covariance_tokens, covariance_seq_len: token positions in C and the window length.
    """

    layers: list[int] | None = None
    v_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_nll: float = 0.05
    context_prefixes: int = 5
    context_length: int = 10
    covariance_corpus: str | None = None
    covariance_tokens: int = 100_000
    covariance_seq_len: int = 128
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.layers is not None:
            if isinstance(self.layers, int):
                self.layers = [self.layers]
            if not self.layers or any(not isinstance(x, int) or x < 0 for x in self.layers):
                raise ConfigError(f"layers={self.layers!r}: give a non-empty list of layer numbers")
            if sorted(set(self.layers)) != list(self.layers):
                raise ConfigError(f"layers={self.layers!r}: list them once each, ascending")
        for name in ("v_steps", "context_length", "covariance_tokens", "covariance_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("v_lr", "clamp_factor"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("kl_factor", "v_weight_decay", "early_stop_nll"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")


class LocateEditor(Editor):
    """Shared access to templates, covariance, keys and target values for one model."""

    config: LocateEditConfig
    layer_family: str = "memit"

    def __init__(self, model: EditableModel, config: LocateEditConfig) -> None:
        super().__init__(model, config)
        self.layers = list(config.layers) if config.layers else default_layers(model, self.layer_family)
        for layer in self.layers:
            model.check_layer(layer, f"{type(config).__name__}.layers")
        self._covariance: dict[int, torch.Tensor] = {}

    def templates(self) -> list[str]:
        c = self.config
        return context_templates(self.model, c.context_prefixes, c.context_length, c.seed)

    def covariance(self, layer: int) -> torch.Tensor:
        """C at `layer` (float64, CPU), computed once for all edited layers and cached."""
        if layer not in self._covariance:
            c = self.config
            missing = [x for x in self.layers if x not in self._covariance]
            self._covariance.update(covariance(
                self.model, sorted(set(missing) | {layer}), c.covariance_corpus,
                c.covariance_tokens, c.covariance_seq_len))
        return self._covariance[layer]

    def keys(self, requests: Sequence[EditRequest], layers: Sequence[int]) -> dict[int, torch.Tensor]:
        return compute_keys(self.model, requests, layers, self.templates())

    def target_values(self, requests: Sequence[EditRequest], layer: int, site: str) -> TargetValues:
        c = self.config
        return optimise_target_values(
            self.model, requests, layer, site, self.templates(),
            steps=c.v_steps, lr=c.v_lr, weight_decay=c.v_weight_decay,
            clamp_factor=c.clamp_factor, kl_factor=c.kl_factor, early_stop_nll=c.early_stop_nll)
