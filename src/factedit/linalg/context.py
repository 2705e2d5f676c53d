"""Context templates: short model-generated prefixes a fact is averaged over.

ROME/MEMIT compute keys and target values over "{prefix}. {prompt}" so the edit does not
depend on the prompt starting the text. The prefixes are sampled once per model and seed and
kept on the model object (never a module global, which would leak one model's prefixes into
the next), and optionally on disk next to the other caches.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..models import EditableModel, cache_root
from ..models.loading import text_digest, write_text_atomic

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
    templates = _read_cached(path, n_prefixes) if use_disk_cache and path.is_file() else None
    if templates is None:
        templates = ["{}"] + [p + ". {}" for p in _sample_prefixes(model, n_prefixes, length, seed)]
        if use_disk_cache:
            _write_cached(path, templates)
    store[key] = templates
    return templates


def _digest(templates: list[str]) -> str:
    return text_digest(json.dumps(templates, ensure_ascii=False))


def _valid_templates(templates: Any, n_prefixes: int) -> bool:
    """The shape `context_templates` writes: "{}", then n prefixes ending in ". {}", with no
    other brace (a stray "{x}" would be read as a format slot)."""
    return (isinstance(templates, list) and len(templates) == n_prefixes + 1
            and all(isinstance(t, str) for t in templates) and templates[0] == "{}"
            and all(t.endswith(". {}") and t.count("{") == 1 and t.count("}") == 1
                    for t in templates[1:]))


def _write_cached(path: Path, templates: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps({"templates": templates, "blake2b": _digest(templates)},
                                       ensure_ascii=False))


def _read_cached(path: Path, n_prefixes: int) -> list[str] | None:
    """The cached templates, or None (with a warning) when the file fails its checksum or
    shape. A file from before the checksum (a bare list) is checked for shape and rewritten
    with one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, list):  # written before the file carried its digest
            templates, digest = data, _digest(data)
            upgrade = True
        else:
            templates, digest, upgrade = data["templates"], data["blake2b"], False
        if not _valid_templates(templates, n_prefixes) or digest != _digest(templates):
            raise ValueError("checksum or shape mismatch")
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("context template cache %s is corrupt (%s); sampling the prefixes again",
                    path, err)
        return None
    if upgrade:
        _write_cached(path, templates)
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
