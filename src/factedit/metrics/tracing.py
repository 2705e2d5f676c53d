"""Causal tracing (Meng et al., 2022, "Locating and Editing Factual Associations in GPT",
section 2): where in the network does the model recall a fact about a subject?

For a prompt such as "The Eiffel Tower is located in the city of" and the token the model
predicts after it (" Paris"):

  1. the clean run gives p_clean = p(answer);
  2. the corrupted run adds Gaussian noise (standard deviation `noise`, ROME: three times the
     standard deviation of subject embeddings) to the embeddings of the subject's tokens, which
     usually destroys the prediction: p_corrupt;
  3. a restored run is the corrupted one with one site copied back from the clean run at the
     subject's LAST token: the block output (the residual stream) at layer l ("hidden"), or
     the MLP outputs of the `window` layers around l ("mlp", ROME's window of 10 on GPT-2 XL's
     48 layers). p_restored(l) - p_corrupt is the site's indirect effect.

Averaged over prompts this is ROME's average indirect effect (AIE); the MLP curve's peak at the
subject's last token is the layer ROME edits (layer 17 of GPT-2 XL), and MEMIT edits a window
of layers ending around it. `TraceResult.centre` gives the curve's centre of mass, which a few
prompts of a small model locate more stably than its argmax. The clean row rides in the same batch as the noisy samples and the
restoration copies from it, as ROME's reference code does, so one forward pass per layer and
site gives all samples. Each restored pass starts at the first restored block from the
corrupted pass's hidden states there (`start_at_layer`), and only the last position's logits
are computed (the 262k-token head of Gemma is the costliest matrix in the model).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..models import EditableModel
from ..models.hooks import TraceDict, get_module, start_at_layer
from ..requests import EditRequest
from ..text import continuation_ids, encode, subject_last_index

SITES = ("mlp", "hidden")


@dataclass
class TracePrompt:
    """One prompt prepared for tracing: its tokens, the subject's token span, the answer."""

    ids: list[int]
    subject_first: int
    subject_last: int
    answer_id: int
    p_clean: float
    case_id: Any = None


@dataclass
class TraceResult:
    """Indirect effects per layer, averaged over prompts.

    effects[site][l]: mean over prompts of p_restored(l) - p_corrupt at the subject's last
    token; p_clean, p_corrupt: means over prompts; per_prompt: each prompt's curves.
    """

    effects: dict[str, list[float]]
    p_clean: float
    p_corrupt: float
    noise: float
    window: int
    samples: int
    prompts: int
    per_prompt: list[dict[str, Any]] = field(default_factory=list)

    def peak(self, site: str = "mlp") -> int:
        """The layer with the largest mean indirect effect of `site` (the first on ties)."""
        curve = self.effects[site]
        return max(range(len(curve)), key=lambda i: (curve[i], -i))

    def centre(self, site: str = "mlp") -> int:
        """The layer at the centre of mass of `site`'s positive indirect effects, rounded
        (the peak where none is positive). With a few prompts of a small model the curve is
        flat and noisy near its top, and its argmax jumps between neighbouring bumps; the
        centre of mass moves little."""
        curve = self.effects[site]
        weights = [max(0.0, v) for v in curve]
        total = sum(weights)
        if total <= 0:
            return self.peak(site)
        return round(sum(i * w for i, w in enumerate(weights)) / total)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the curves, the means and the settings (per-prompt curves left out)."""
        return {"effects": {k: [round(v, 6) for v in c] for k, c in self.effects.items()},
                "peak": {site: self.peak(site) for site in self.effects},
                "centre": {site: self.centre(site) for site in self.effects},
                "p_clean": self.p_clean, "p_corrupt": self.p_corrupt, "noise": self.noise,
                "window": self.window, "samples": self.samples, "prompts": self.prompts}


def default_window(num_layers: int) -> int:
    """ROME's MLP window (10 of GPT-2 XL's 48 layers) scaled to the model's depth, at least 1."""
    return max(1, round(num_layers * 10 / 48))


def _final_hidden(model: EditableModel, ids: torch.Tensor) -> torch.Tensor:
    """The last position's final hidden state (after the final norm), (B, d)."""
    out = model.model.base_model(input_ids=ids)
    hidden = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
    return hidden[:, -1]


@torch.no_grad()
def answer_probabilities(model: EditableModel, ids: torch.Tensor) -> torch.Tensor:
    """Next-token distributions after each row of `ids` (B, T): (B, vocab), float32."""
    logits = model.head_logits(_final_hidden(model, ids))
    return torch.softmax(logits.float(), dim=-1)


def prepare_prompt(model: EditableModel, request: EditRequest,
                   answer: str = "predicted") -> TracePrompt:
    """The request's edit prompt with its subject span and the answer token traced:
    "predicted" (ROME: the model's own top token) or "true" (target_true's first token)."""
    tok = model.tokenizer
    ids, last = subject_last_index(tok, request.prompt, request.subject)
    head = request.prompt[: request.prompt.index("{}")]
    first = len(encode(tok, head)) if head else len(encode(tok, ""))
    first = min(first, last)
    x = torch.tensor([ids], device=model.device)
    probs = answer_probabilities(model, x)[0]
    if answer == "true":
        if not request.target_true:
            raise ValueError(f"record {request.case_id!r} has no target_true to trace")
        answer_id = continuation_ids(tok, request.rewrite_prompt, request.target_true)[0]
    elif answer == "predicted":
        answer_id = int(probs.argmax())
    else:
        raise ValueError(f"answer={answer!r}: choose 'predicted' or 'true'")
    return TracePrompt(ids=ids, subject_first=first, subject_last=last, answer_id=answer_id,
                       p_clean=float(probs[answer_id]), case_id=request.case_id)


@torch.no_grad()
def embedding_std(model: EditableModel, prompts: Sequence[TracePrompt]) -> float:
    """Standard deviation of the embedding outputs at the prompts' subject tokens (what the
    model's own embedding scale, Gemma's sqrt(d) included, puts there)."""
    embed = get_module(model.model, model.arch.embed)
    values = []
    for p in prompts:
        x = torch.tensor([p.ids[p.subject_first: p.subject_last + 1]], device=model.device)
        values.append(embed(x).double().flatten())
    return float(torch.cat(values).std())


@torch.no_grad()
def trace_prompt(model: EditableModel, prompt: TracePrompt, noise: float, samples: int = 10,
                 window: int | None = None, sites: Sequence[str] = SITES,
                 seed: int = 0) -> dict[str, Any]:
    """One prompt's p_corrupt and restored probabilities per layer and site (module
    docstring); row 0 of each batch is the clean run, rows 1..samples the noisy ones."""
    unknown = [s for s in sites if s not in SITES]
    if unknown:
        raise ValueError(f"sites={list(sites)!r}: choose from {', '.join(SITES)}")
    window = window or default_window(model.num_layers)
    n_layers = model.num_layers
    x = torch.tensor([prompt.ids] * (samples + 1), device=model.device)
    gen = torch.Generator().manual_seed(seed)
    span = slice(prompt.subject_first, prompt.subject_last + 1)
    embed = get_module(model.model, model.arch.embed)

    def corrupt(_module, _inputs, output):
        out = output.clone()
        shape = (samples, span.stop - span.start, out.shape[-1])
        out[1:, span] += (torch.randn(shape, generator=gen) * noise).to(out.dtype).to(out.device)
        return out

    def restore_hook(_module, _inputs, output):
        tensor = output[0] if isinstance(output, tuple) else output
        tensor = tensor.clone()
        tensor[1:, prompt.subject_last] = tensor[0, prompt.subject_last]
        return (tensor, *output[1:]) if isinstance(output, tuple) else tensor

    def noisy_pass() -> tuple[list[torch.Tensor], float]:
        """The corrupted pass: its input to every block (row 0 clean) and p_corrupt."""
        gen.manual_seed(seed)
        handle = embed.register_forward_hook(corrupt)
        try:
            with TraceDict(model.model, [model.arch.layer(i) for i in range(n_layers)],
                           retain_input=True) as traces:
                probs = answer_probabilities(model, x)
        finally:
            handle.remove()
        return ([traces[model.arch.layer(i)].input for i in range(n_layers)],
                float(probs[1:, prompt.answer_id].mean()))

    def run(start: int, restore: Sequence[str]) -> float:
        # The blocks below the first restored one compute what the corrupted pass computed:
        # start there with its hidden states (about half the cost of a full pass).
        handles = [get_module(model.model, name).register_forward_hook(restore_hook)
                   for name in restore]
        try:
            with start_at_layer(model.layers, start, block_inputs[start],
                                model.block_returns_tuple):
                probs = answer_probabilities(model, x)
        finally:
            for h in handles:
                h.remove()
        return float(probs[1:, prompt.answer_id].mean())

    block_inputs, p_corrupt = noisy_pass()
    curves: dict[str, list[float]] = {}
    for site in sites:
        curve = []
        for layer in range(n_layers):
            if site == "hidden":
                lo, names = layer, [model.arch.layer(layer)]
            else:
                lo = max(0, layer - window // 2)
                hi = min(n_layers, layer - (-window // 2))
                names = [model.arch.mlp_at(i) for i in range(lo, hi)]
            curve.append(run(lo, names) - p_corrupt)
        curves[site] = curve
    return {"case_id": prompt.case_id, "p_clean": prompt.p_clean, "p_corrupt": p_corrupt,
            "answer_id": prompt.answer_id, "effects": curves}


def causal_trace(model: EditableModel, requests: Sequence[EditRequest], samples: int = 10,
                 window: int | None = None, noise: float | None = None,
                 noise_factor: float = 3.0, sites: Sequence[str] = SITES,
                 answer: str = "predicted", seed: int = 0) -> TraceResult:
    """Average indirect effects over `requests` (module docstring). noise: the noise standard
    deviation (None: `noise_factor` times the subject embeddings' standard deviation)."""
    if not requests:
        raise ValueError("causal_trace needs at least one request")
    if samples < 1:
        raise ValueError(f"samples={samples!r}: give 1 or more noisy runs per prompt")
    prompts = [prepare_prompt(model, r, answer) for r in requests]
    if noise is None:
        noise = noise_factor * embedding_std(model, prompts)
    window = window or default_window(model.num_layers)
    rows = [trace_prompt(model, p, noise, samples, window, sites, seed) for p in prompts]
    effects = {site: [sum(r["effects"][site][i] for r in rows) / len(rows)
                      for i in range(model.num_layers)] for site in sites}
    return TraceResult(effects=effects, p_clean=sum(p.p_clean for p in prompts) / len(prompts),
                       p_corrupt=sum(r["p_corrupt"] for r in rows) / len(rows), noise=noise,
                       window=window, samples=samples, prompts=len(prompts), per_prompt=rows)
