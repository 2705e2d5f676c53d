"""Knowledge Neurons (Dai et al., ACL 2022): find the FFN neurons that express a fact, then
rewrite their value slots.

Attribution. For a prompt x whose answer starts with token y*, layer l and intermediate FFN
neuron i (the inputs of the MLP output projection, at the position that predicts y*), with
the layer's activations a = a(x) scaled by alpha from 0 to 1:

    Attr_i^l = a_i * integral_0^1 dP(y* | x; alpha a) / d(alpha a_i) d alpha
             ~ a_i / m * sum_{k=1..m} dP(y* | x; (k/m) a) / d(alpha a_i)     (Riemann, m steps)

All m interpolation steps run as m rows of one batched forward (and one backward) per layer
and prompt; the blocks below l are computed once and fed in (`start_at_layer`), and so are
the keys and values of the positions before the answer's (the scaling cannot reach them):
each pass runs one position through the blocks from l on.

Selection (the paper's two thresholds): per prompt, keep neurons with attribution above
`adaptive_threshold` x the largest attribution over the searched layers; over the prompts
(the edit prompt and its paraphrases), keep neurons kept for at least `share_threshold` of
them; at most `max_neurons` (largest mean attribution first).

Edit ("updating facts", Sec. 5.1): for every kept neuron i of layer l, with value slot
v_i = W_out^l[:, i] (the column of the MLP output projection it writes),

    v_i <- v_i - erase_scale * e(target_true) + update_scale * e(target_new)

e(.) being the output word embedding (LM head row) of the answer's first token. Where the
paper uses the ground-truth answer y*, we attribute target_true when the request has one,
else the model's current greedy answer.

Departures from the paper: it studies BERT's fill-in-the-blank; here the attribution is at
the causal LM's next-token position. Scales default to 0.5 (the paper gives no values for
GPT-style models; see KnConfig for the measurement) and, because LM-head rows and value slots differ in norm between models,
e(.) is rescaled to the mean value-slot norm of its layer (`normalise_embeddings`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..models import EditableModel, Trace, TraceDict, frozen, read_param, start_at_layer
from ..requests import EditRequest
from ..text import continuation_ids, encode
from .base import ConfigError, Editor, EditResult, MethodConfig, register_method
from .config import check_layer_list, check_positive


@dataclass
class KnConfig(MethodConfig):
    """Knowledge Neurons.

    layers: layers searched for neurons (None: the top half, where the paper finds almost
        all knowledge neurons; every layer searched costs one batched pass per prompt).
    ig_steps: Riemann steps m of the integrated gradients (one batched forward).
    adaptive_threshold: per prompt, keep attributions > this x the maximum (paper: 0.2).
    share_threshold: keep neurons found for at least this fraction of prompts (paper: 0.7
        for its many prompts; with one or two paraphrases 0.5 keeps what most agree on).
    max_neurons: cap on the neurons edited.
    erase_scale, update_scale: lambda_1 and lambda_2 of the update.
    normalise_embeddings: rescale e(.) to the layer's mean value-slot norm.
    use_paraphrases: attribute on the paraphrases too (the paper's several prompts).
    """

    layers: list[int] | None = None
    ig_steps: int = 20
    adaptive_threshold: float = 0.2
    share_threshold: float = 0.5
    max_neurons: int = 10
    # Measured on SmolLM2-135M, Eiffel Tower -> Rome (10 neurons, layers 16-29): 0.35 leaves
    # "Paris", 0.5 says "Rome" while the Louvre keeps "Paris", 0.7 moves the Louvre to Rome
    # too. Value-slot edits are blunt: the window between no effect and collateral is narrow.
    erase_scale: float = 0.5
    update_scale: float = 0.5
    normalise_embeddings: bool = True
    use_paraphrases: bool = True

    def __post_init__(self) -> None:
        check_layer_list(self)
        check_positive(self, "ig_steps", "max_neurons")
        for name in ("adaptive_threshold", "share_threshold"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ConfigError(f"KnConfig.{name}={value!r}: must be in (0, 1]")
        for name in ("erase_scale", "update_scale"):
            if getattr(self, name) < 0:
                raise ConfigError(f"KnConfig.{name} must be >= 0")


class KnEditor(Editor):
    """Knowledge Neurons: attribute the answer to FFN neurons by integrated gradients, then
    rewrite the kept neurons' value slots (module docstring)."""

    config_cls = KnConfig
    config: KnConfig

    def __init__(self, model: EditableModel, config: KnConfig) -> None:
        super().__init__(model, config)
        self.layers = (list(config.layers) if config.layers
                       else list(range(model.num_layers // 2, model.num_layers)))
        for layer in self.layers:
            model.check_layer(layer, "KnConfig.layers")

    def attribution(self, prompt: str, answer_token: int,
                    layers: Sequence[int] | None = None) -> dict[int, torch.Tensor]:
        """Integrated-gradients attribution of every intermediate neuron: {layer: (d_ff,)}
        for `layers` (default: the searched layers)."""
        model, m = self.model, self.config.ig_steps
        layers = list(self.layers if layers is None else layers)
        ids = torch.tensor([encode(model.tokenizer, prompt)], device=model.device)
        # Scaling the answer position's activations changes nothing before it (causal
        # attention), so the earlier positions' keys and values are computed once, unscaled,
        # and every batched pass runs the answer position alone against them. no_grad, not
        # inference_mode: the attention's backward saves these keys and values.
        past, field = None, model.cache_field
        with torch.no_grad():
            if ids.shape[1] > 1:
                past = model.model.base_model(input_ids=ids[:, :-1], use_cache=True)[field]

        def with_cache() -> dict[str, Any]:
            # The cache keyword with a fresh copy: every pass appends to the cache it gets.
            return {"use_cache": past is not None, field: copy.deepcopy(past)}

        run_ids = ids if past is None else ids[:, -1:]  # no cache: the whole prompt
        names = [model.arch.layer(layer) for layer in layers]
        with torch.no_grad(), TraceDict(model.model, names, retain_input=True,
                                        stop=True) as blocks:
            model.model.base_model(input_ids=run_ids, **with_cache())
        if past is not None:
            past.batch_repeat_interleave(m)
        alphas = torch.arange(1, m + 1, device=model.device, dtype=torch.float32) / m
        return {layer: self._integrated_gradients(
                    layer, run_ids.expand(m, -1), blocks[name].input.expand(m, -1, -1).clone(),
                    with_cache(), alphas, answer_token)
                for layer, name in zip(layers, names)}

    def _integrated_gradients(self, layer: int, run_ids: torch.Tensor, hidden_in: torch.Tensor,
                              cache: dict[str, Any], alphas: torch.Tensor, answer_token: int
                              ) -> torch.Tensor:
        """a * mean_k dP(answer | (k/m) a) / da for `layer`'s activations a at the answer
        position, the m steps as m rows of one pass from `layer` on; `cache`: the base
        model's cache keywords (use_cache and a cache of the positions before, or None)."""
        model = self.model
        scaled: list[torch.Tensor] = []
        activation: list[torch.Tensor] = []

        def scale_last(x: torch.Tensor, _name: str) -> torch.Tensor:
            # Row k carries (k/m) a at the answer position; the gradient is taken there.
            a = x[:, -1].detach()
            activation.append(a[0])
            point = (alphas.to(a.dtype).unsqueeze(1) * a).requires_grad_(True)
            scaled.append(point)
            x = x.clone()
            x[:, -1] = point
            return x

        with frozen(model.model):
            with start_at_layer(model.layers, layer, hidden_in, model.block_returns_tuple), \
                 Trace(model.model, model.arch.mlp_out_at(layer), edit_input=scale_last):
                hidden = model.model.base_model(input_ids=run_ids, **cache).last_hidden_state
            probs = torch.softmax(model.head_logits(hidden[:, -1]).float(), dim=-1)
            (grad,) = torch.autograd.grad(probs[:, answer_token].sum(), scaled[0])
        return (activation[0].float() * grad.float().mean(0)).detach()

    def find_neurons(self, request: EditRequest) -> list[tuple[int, int]]:
        """(layer, neuron) pairs that express the request's current answer."""
        c = self.config
        prompts = [request.rewrite_prompt] + (list(request.paraphrases) if c.use_paraphrases else [])
        kept: list[set[tuple[int, int]]] = []
        scores: dict[tuple[int, int], float] = {}
        for prompt in prompts:
            answer = self._answer_token(prompt, request)
            attr = self.attribution(prompt, answer)
            top = max(float(a.max()) for a in attr.values())
            chosen = set()
            if top > 0:
                for layer, a in attr.items():
                    for i in torch.nonzero(a > c.adaptive_threshold * top).flatten().tolist():
                        chosen.add((layer, i))
                        scores[(layer, i)] = scores.get((layer, i), 0.0) + float(a[i]) / len(prompts)
            kept.append(chosen)
        counts: dict[tuple[int, int], int] = {}
        for chosen in kept:
            for n in chosen:
                counts[n] = counts.get(n, 0) + 1
        shared = [n for n, k in counts.items() if k >= c.share_threshold * len(prompts)]
        shared.sort(key=lambda n: -scores[n])
        return shared[:c.max_neurons]

    def _answer_token(self, prompt: str, request: EditRequest) -> int:
        if request.target_true:
            return continuation_ids(self.model.tokenizer, prompt, request.target_true)[0]
        with torch.inference_mode():
            ids = torch.tensor([encode(self.model.tokenizer, prompt)], device=self.model.device)
            hidden = self.model.model.base_model(input_ids=ids, use_cache=False).last_hidden_state
            return int(self.model.head_logits(hidden[0, -1]).argmax())

    def _embedding(self, token: int) -> torch.Tensor:
        head = read_param(self.model.model, self.model.arch.lm_head + ".weight")
        return head[token].to("cpu", torch.float64)

    def compute(self, requests: Sequence[EditRequest]) -> EditResult:
        """For each request, find its neurons and add to their value slots update_scale x
        target_new's embedding minus erase_scale x the old answer's; returns the deltas and
        the neurons found."""
        c, tok = self.config, self.model.tokenizer
        result = EditResult()
        slots: dict[int, torch.Tensor] = {}
        slot_norm: dict[int, float] = {}  # mean value-slot norm per layer, read once
        found = []
        for request in requests:
            with result.timed("attribution"):
                neurons = self.find_neurons(request)
            found.append(neurons)
            new = self._embedding(continuation_ids(tok, request.rewrite_prompt, request.target_new)[0])
            old = self._embedding(self._answer_token(request.rewrite_prompt, request))
            with result.timed("update"):
                for layer, i in neurons:
                    if layer not in slots:
                        W = self.model.weight(layer).to("cpu", torch.float64)  # (d_out, d_ff)
                        slots[layer] = torch.zeros_like(W)
                        slot_norm[layer] = float(W.norm(dim=0).mean())
                    delta = slots[layer]
                    scale = 1.0
                    if c.normalise_embeddings:
                        scale = slot_norm[layer] / float(new.norm().clamp_min(1e-12))
                    delta[:, i] += scale * (c.update_scale * new - c.erase_scale * old)
        for layer, delta in slots.items():
            param = self.model.mlp_out(layer).weight
            result.deltas[self.weight_param_name(layer)] = self.as_param_delta(delta, param)
        result.info["neurons"] = found
        return result


register_method("kn", KnConfig, KnEditor,
                "knowledge neurons: integrated-gradients attribution, value-slot rewrite "
                "(Dai et al. 2022)")
