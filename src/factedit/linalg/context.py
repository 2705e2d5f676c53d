"""Context templates: short model-generated prefixes a fact is averaged over.

ROME/MEMIT compute keys and target values over "{prefix}. {prompt}" so the edit does not
depend on the prompt starting the text. The prefixes are sampled once per model and seed and
kept on the model object (never a module global, which would leak one model's prefixes into
the next), and optionally on disk next to the other caches.
"""

from __future__ import annotations

import json
import logging

import torch

from ..models import EditableModel, cache_root
from ..models.loading import partial_path

log = logging.getLogger(__name__)

_STARTS = ("The", "Therefore", "Because", "I", "You")


def context_templates(
    model: EditableModel, n_prefixes: int = 5, length: int = 10, seed: int = 0,
    use_disk_cache: bool = True,
) -> list[str]:
    """["{}", "<prefix 1>. {}", ...]: the bare prompt plus `n_prefixes` sampled prefixes."""
    key = (n_prefixes, length, seed)
    store: dict = model.__dict__.setdefault("_context_templates", {})
    if key in store:
        return store[key]
    path = cache_root() / "context" / f"{model.model_id}_{n_prefixes}x{length}_s{seed}.json"
    templates: list[str] | None = None
    if use_disk_cache and path.is_file():
        try:
            templates = json.loads(path.read_text())
            assert isinstance(templates, list) and templates[0] == "{}"
        except (ValueError, AssertionError):
            log.warning("context template cache %s is corrupt; regenerating", path)
            templates = None
    if templates is None:
        templates = ["{}"] + [p + ". {}" for p in _sample_prefixes(model, n_prefixes, length, seed)]
        if use_disk_cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = partial_path(path)
            tmp.write_text(json.dumps(templates, ensure_ascii=False))
            tmp.replace(path)
    store[key] = templates
    return templates


def _sample_prefixes(model: EditableModel, n: int, length: int, seed: int) -> list[str]:
    if n == 0:
        return []
    starts = [_STARTS[i % len(_STARTS)] for i in range(n)]
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        texts = model.generate(starts, max_new_tokens=length, do_sample=True, top_k=5)
    finally:
        torch.random.set_rng_state(generator_state)
    # Braces would be read as format slots; newlines would split the prompt oddly.
    cleaned = []
    for start, text in zip(starts, texts):
        t = (start + text).replace("{", " ").replace("}", " ").replace("\n", " ").strip()
        cleaned.append(" ".join(t.split()))
    return cleaned
