"""Covariance statistics C = E[k k^T] of MLP-output-projection inputs over a text corpus.

Accumulated in float64 over packed token windows (no padding is wasted), several layers in
one pass, the forward pass stopped after the deepest layer. Each batch's k^T k is formed as
three blocks of the symmetric product (the fourth is the transpose of one), a quarter of the
multiply-adds saved. precision="mixed" forms each batch's product in float32 (the keys are
float32 already; a batch is ~1,000 tokens) and still accumulates batches in float64: about
twice as fast on CPU, relative error ~1e-6, a separate cache file. Cached on disk under a
name built from every input (model, layer module, corpus digest, token count, window length,
precision); the file carries a digest of its own tensor and is recomputed, with a warning,
when it does not match.

Corpus: a text file, a folder of .txt/.raw/.tokens files, or None for text sampled from the
model itself (so the built-in demo needs no download; the sample is cached too).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..models import EditableModel, TraceDict, cache_root
from ..models.loading import partial_path, text_digest

log = logging.getLogger(__name__)

_TEXT_SUFFIXES = {".txt", ".raw", ".tokens", ".text"}


def _tensor_digest(t: torch.Tensor) -> str:
    return hashlib.blake2b(t.contiguous().numpy().tobytes()).hexdigest()[:32]


def corpus_text(model: EditableModel, corpus: str | Path | None, n_tokens: int,
                seed: int = 0) -> tuple[str, str]:
    """(text, corpus_id). The id is a content digest, so edits to the files invalidate caches."""
    if corpus is None:
        return _model_samples(model, n_tokens, seed)
    path = Path(corpus).expanduser()
    files = corpus_files(corpus)
    text = "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    digest = hashlib.blake2b(text.encode()).hexdigest()[:12]
    return text, f"{path.name}-{digest}"


def corpus_files(corpus: str | Path) -> list[Path]:
    """The text files a covariance corpus reads: the file itself, or a folder's files with a
    text suffix (.txt, .raw, .tokens, .text), sorted. FileNotFoundError naming the path when
    there are none (an empty name, a missing path, a folder without text files)."""
    if not str(corpus).strip():
        raise FileNotFoundError("corpus '' is empty: give a text file or folder")
    path = Path(corpus).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _TEXT_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"corpus folder {path} has no {sorted(_TEXT_SUFFIXES)} files")
        return files
    if path.is_file():
        return [path]
    raise FileNotFoundError(f"corpus {path} does not exist (give a text file or folder)")


def _model_samples(model: EditableModel, n_tokens: int, seed: int) -> tuple[str, str]:
    corpus_id = f"model-samples-s{seed}-n{n_tokens}"
    path = cache_root() / "corpus" / f"{model.model_id}_{corpus_id}.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            text = data["text"]
            digest = data.get("blake2b")
            if digest is None:  # written before the file carried its digest: add it
                _write_sampled(path, text)
            elif digest != text_digest(text):
                raise ValueError("checksum mismatch")
            return text, corpus_id
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            log.warning("sampled corpus cache %s is corrupt (%s); resampling", path, err)
    # Said once, before the sampling: what this is, how to skip it, where it goes; after the
    # first batch, how long the rest will take at the rate this machine shows.
    log.warning("no covariance corpus given: sampling %d tokens of text from %s to estimate "
                "the key covariance C (once per model and token count, cached in %s; about "
                "a minute per 5,000 tokens on 2 idle CPU cores for the built-in model). To "
                "skip it, pass a text file or folder (--corpus, covariance.corpus, "
                "covariance_corpus=...)", n_tokens, model.model_id, path.parent)
    starts = ["The", "In", "A", "It", "He", "She", "This", "When", "After", "According to",
              "Many", "One", "There", "His", "Her", "During"]
    per_seq, batch = 128, 32
    n_seq = max(1, -(-n_tokens // per_seq))
    texts: list[str] = []
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    start = time.perf_counter()
    try:
        for i in tqdm(range(0, n_seq, batch), desc="sampling corpus from the model",
                      unit="batch"):
            prompts = [starts[(i + j) % len(starts)] for j in range(min(batch, n_seq - i))]
            outs = model.generate(prompts, max_new_tokens=per_seq, do_sample=True, top_k=40)
            texts += [p + o for p, o in zip(prompts, outs)]
            if i == 0 and n_seq > batch:
                left = (time.perf_counter() - start) * (n_seq - batch) / batch
                log.warning("sampling for the covariance: about %s more at this rate (%d of "
                            "%d tokens done)", _duration(left), batch * per_seq, n_tokens)
    finally:
        torch.random.set_rng_state(state)
    text = "\n\n".join(texts)
    _write_sampled(path, text)
    return text, corpus_id


def _duration(seconds: float) -> str:
    """'40 s', '3 min', '1.5 h': a wait said in words a person reads at a glance."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def _write_sampled(path: Path, text: str) -> None:
    """The sampled corpus with its digest, via a temporary file (a kill leaves no half file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    tmp.write_text(json.dumps({"text": text, "blake2b": text_digest(text)}))
    tmp.replace(path)


PRECISIONS = ("float64", "mixed")


def _cache_path(model: EditableModel, module: str, corpus_id: str, n_tokens: int,
                seq_len: int, precision: str = "float64") -> Path:
    return (cache_root() / "stats" / model.model_id /
            f"{module}__{corpus_id}__n{n_tokens}__len{seq_len}__{precision}.safetensors")


def accumulate_gram(total: torch.Tensor, k: torch.Tensor, precision: str = "float64") -> None:
    """total += k^T k in place (total float64 (d, d), k (tokens, d)), by symmetric blocks."""
    k = k.to(torch.float64 if precision == "float64" else torch.float32)
    h = k.shape[1] // 2
    a, b = k[:, :h], k[:, h:]
    off = (a.T @ b).to(torch.float64)
    total[:h, :h] += a.T @ a
    total[:h, h:] += off
    total[h:, :h] += off.T
    total[h:, h:] += b.T @ b


def _load_cached(path: Path) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        C = load_file(str(path))["C"]
        if meta.get("digest") != _tensor_digest(C):
            raise ValueError("digest mismatch")
        return C
    except Exception as err:  # noqa: BLE001 - any unreadable cache is rebuilt
        warnings.warn(f"covariance cache {path} is corrupt ({err}); recomputing it", stacklevel=3)
        return None


def covariance(
    model: EditableModel,
    layers: Sequence[int],
    corpus: str | Path | None = None,
    n_tokens: int = 100_000,
    seq_len: int = 128,
    batch_size: int = 8,
    use_cache: bool = True,
    progress: bool = True,
    precision: str = "float64",
) -> dict[int, torch.Tensor]:
    """C for each layer: layer -> (d_in, d_in) float64 on CPU, E over n_tokens token positions.

    precision: "float64" (every product in float64) or "mixed" (each batch's product in
    float32, batches summed in float64; module docstring).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"covariance precision={precision!r}: choose one of {PRECISIONS}")
    layers = [model.check_layer(layer, "covariance layer") for layer in layers]
    corpus_id = None
    result: dict[int, torch.Tensor] = {}
    modules = {layer: model.arch.mlp_out_at(layer) for layer in layers}
    text: str | None = None
    if corpus is None:
        corpus_id = f"model-samples-s0-n{n_tokens}"
    else:
        text, corpus_id = corpus_text(model, corpus, n_tokens)
    if use_cache:
        for layer in layers:
            C = _load_cached(_cache_path(model, modules[layer], corpus_id, n_tokens, seq_len,
                                         precision))
            if C is not None:
                result[layer] = C
    todo = [layer for layer in layers if layer not in result]
    if not todo:
        return result
    if text is None:
        text, corpus_id = corpus_text(model, corpus, n_tokens)
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    n_windows = min(len(ids) // seq_len, -(-n_tokens // seq_len))
    if n_windows == 0:
        raise ValueError(f"corpus {corpus_id} has fewer than seq_len={seq_len} tokens")
    if n_windows * seq_len < n_tokens:
        log.warning("corpus %s has only %d tokens; using all of them (asked for %d)",
                    corpus_id, n_windows * seq_len, n_tokens)
    windows = torch.tensor(ids[: n_windows * seq_len]).view(n_windows, seq_len)
    names = [modules[layer] for layer in todo]
    sums: dict[str, torch.Tensor | None] = {name: None for name in names}
    count = 0
    bar = tqdm(total=n_windows * seq_len, desc=f"covariance layers {todo}", unit="tok",
               unit_scale=True, disable=not progress)
    with torch.inference_mode():
        for start in range(0, n_windows, batch_size):
            batch = windows[start: start + batch_size].to(model.device)
            with TraceDict(model.model, names, retain_input=True, stop=True) as traces:
                model.model(input_ids=batch, use_cache=False)
            for name in names:
                k = traces[name].input.reshape(-1, traces[name].input.shape[-1])
                if sums[name] is None:  # on the keys' device: no copy back per batch
                    sums[name] = torch.zeros(k.shape[1], k.shape[1], dtype=torch.float64,
                                             device=k.device)
                accumulate_gram(sums[name], k, precision)
            count += batch.numel()
            bar.update(batch.numel())
    bar.close()
    for layer in todo:
        total = sums[modules[layer]].cpu()
        C = (total + total.T) / (2 * count)  # exactly symmetric, whatever the BLAS rounds
        result[layer] = C
        if use_cache:
            path = _cache_path(model, modules[layer], corpus_id, n_tokens, seq_len, precision)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = partial_path(path)
            save_file({"C": C.contiguous()}, str(tmp),
                      metadata={"digest": _tensor_digest(C), "count": str(count),
                                "model": model.model_id, "module": modules[layer],
                                "corpus": corpus_id})
            tmp.replace(path)
    return result
