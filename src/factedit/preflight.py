"""What a command can check before it loads a model, and the checks that need only the
tokenizer (prompt lengths). Each check raises an error whose message names the flag or field
and the fix; `factedit` prints it as `factedit <command>: error: ...` and exits 2.

    factedit edit   method name, --set fields (names and types), --layers (numbers, and
                    within the model's depth where its config.json is at hand), --mode and
                    --batch-size against the method, the --requests file (every record, by
                    index), the model name (alias, file, folder, offline hub cache), the
                    --device, and the --save / --patch destinations (not a file, not a
                    non-empty folder unless --force, writable)
    factedit report --out is not an existing file and its place is writable

docs/errors.md lists what is checked where.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .linalg.covariance import corpus_files
from .methods import ConfigError, MethodConfig, get_method
from .models import EditableModel
from .models.atomic import DestinationError, check_destination
from .models.loading import (
    cache_root,
    file_digest,
    resolve_device,
    resolve_source,
    verified_cache_file,
)
from .requests import EditRequest, InvalidRequestError

log = logging.getLogger(__name__)

# Fields of method configs that name layers (checked against the model's depth).
LAYER_FIELDS = ("layer", "layers", "retrieval_layer")
# Prompts longer than this (in tokens) get a warning: editing cost grows with the length, and
# fact prompts are a sentence (CounterFact's longest rewrite prompt is under 30 tokens).
LONG_PROMPT_TOKENS = 256


class PreflightError(ValueError):
    """A command-line input is invalid; the message names the flag or field and the fix."""


def parse_layers(text: str, flag: str = "--layers") -> list[int]:
    """ "4,5,6" -> [4, 5, 6]; anything else is refused naming the flag."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        layers = [int(p) for p in parts]
    except ValueError:
        raise PreflightError(f"{flag} {text!r}: give comma-separated layer numbers, e.g. "
                             f"{flag} 4,5,6") from None
    if any(x < 0 for x in layers):
        raise PreflightError(f"{flag} {text!r}: layer numbers start at 0")
    return layers


def method_config(method: Any, overrides: dict[str, Any], flag: str = "--set"
                  ) -> MethodConfig:
    """The method's config built from `overrides`, or an error naming the method or the
    field (with the flag that set it)."""
    spec = get_method(method)
    try:
        return spec.config_cls.from_dict(dict(overrides))
    except ConfigError as err:
        raise ConfigError(f"{flag}: {err}") from None
    except TypeError as err:  # a config whose own checks compare a value of the wrong type
        raise ConfigError(f"{flag}: {spec.config_cls.__name__}: {err}") from None


def model_config_json(name: str) -> dict[str, Any] | None:
    """The model's config.json without loading it: from its folder, the GGUF cache or the
    local Hugging Face cache; None where it is not at hand (a first GGUF load)."""
    kind, path = resolve_source(name)
    candidates: list[Path] = []
    if kind == "folder" and path is not None:
        candidates.append(path / "config.json")
    elif kind == "gguf" and path is not None:
        # Only a config.json that matches the cache's checksum: a changed one (fewer layers)
        # would make valid layers look out of range; the load rebuilds it with a warning.
        digest = file_digest(path)[:16]
        verified = verified_cache_file(cache_root() / "models" / f"{path.stem}-{digest}",
                                       "config.json")
        candidates += [verified] if verified is not None else []
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "config.json")
            if isinstance(cached, str):
                candidates.append(Path(cached))
        except Exception:  # noqa: BLE001  an unusual hub id: the load will say what is wrong
            pass
    for candidate in candidates:
        try:
            data = json.loads(candidate.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        return data if isinstance(data, dict) else None
    return None


def layer_count(config_json: dict[str, Any] | None) -> int | None:
    """The model's number of layers read from its config.json without loading it (None when unknown)."""
    if not config_json:
        return None
    text = config_json.get("text_config") or {}
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        for source in (config_json, text):
            if isinstance(source.get(key), int):
                return source[key]
    return None


def check_layers(config: MethodConfig, n_layers: int | None, flag: str = "--set") -> None:
    """Every layer field of `config` within 0..n_layers-1 (skipped when n_layers is unknown)."""
    if n_layers is None:
        return
    for f in fields(config):
        if f.name not in LAYER_FIELDS:
            continue
        value = getattr(config, f.name)
        values = value if isinstance(value, list) else [value]
        bad = [v for v in values if isinstance(v, int) and not 0 <= v < n_layers]
        if bad:
            raise PreflightError(f"{flag} {f.name}={value!r}: this model has layers 0.."
                                 f"{n_layers - 1}; choose layers in that range (factedit info "
                                 f"shows the defaults)")


def check_mode(method: str, mode: str | None, batch_size: int) -> None:
    """--batch-size at least 1, and a batch mode only for methods the registry says batch."""
    spec = get_method(method)
    if batch_size < 1:
        raise PreflightError(f"--batch-size {batch_size}: give 1 or more")
    if mode in ("batch", "sequential-batch") and not spec.supports_batch:
        raise PreflightError(f"--mode {mode}: method {spec.name!r} edits one request at a "
                             f"time; use --mode sequential or single")


# Method config fields that name files or folders read during the edit (checked up front).
PATH_FIELDS = {"covariance_corpus": "--corpus", "checkpoint": "--set checkpoint",
               "classifier": "--set classifier"}


def check_paths(config: MethodConfig, prefix: str | None = None) -> None:
    """Each path field of `config` that is set names something that exists. `prefix`: name
    the fields as `prefix.field` (an experiment file's methods[i].config) instead of by flag."""
    names = {f.name for f in fields(config)}
    for name, flag in PATH_FIELDS.items():
        flag = f"{prefix}.{name}" if prefix else flag
        value = getattr(config, name, None) if name in names else None
        if isinstance(value, str) and not value.strip():
            raise PreflightError(f"{flag} '': the path is empty; give a file or folder "
                                 f"({name} of {type(config).__name__})")
        if isinstance(value, str) and not Path(value).expanduser().exists():
            raise PreflightError(f"{flag} {value}: no such file or folder ({name} of "
                                 f"{type(config).__name__})")
        if name == "covariance_corpus" and isinstance(value, str):
            try:
                corpus_files(value)
            except FileNotFoundError as err:
                raise PreflightError(f"{flag} {value}: {err}; give a text file or a folder "
                                     f"of them") from None


@dataclass
class EditPlan:
    """What `factedit edit` will do, all checked before the model loads."""

    requests: list[EditRequest]
    method: str
    overrides: dict[str, Any]
    config: MethodConfig


# Tokens `factedit edit` samples from the model for the key covariance C when no corpus is
# given and no --covariance-tokens either (the methods' own default, 100,000, is for a text
# corpus, where reading costs little). Sampling runs at about a minute per 5,000 tokens on two
# idle CPU cores; ROME's scores are the same from 2,500 to 20,000 sampled tokens, MEMIT's
# batch of 100 still moves between 5,000 and 20,000 (docs/results/covariance-tokens), so
# 20,000, a fifth of the methods' 100,000; pass a corpus for large MEMIT-family batches.
# `factedit demo` and `factedit serve` sample as many.
SAMPLED_COVARIANCE_TOKENS = 20_000


def _samples_covariance(config: MethodConfig) -> bool:
    """Whether `config` estimates a covariance from text sampled from the model (no corpus)."""
    names = {f.name for f in fields(config)}
    return {"covariance_tokens", "covariance_corpus"} <= names and config.covariance_corpus is None


def check_edit(args: Any, overrides: dict[str, Any], requests: list[EditRequest]) -> EditPlan:
    """Every check of `factedit edit` that needs no model; raises with the flag named."""
    config = method_config(args.method, overrides)
    if "covariance_tokens" not in overrides and _samples_covariance(config):
        overrides = {**overrides, "covariance_tokens": SAMPLED_COVARIANCE_TOKENS}
        config = method_config(args.method, overrides)
    check_mode(args.method, args.mode, args.batch_size)
    check_paths(config)
    if getattr(args, "max_new_tokens", 1) < 0:
        raise PreflightError(f"--max-new-tokens {args.max_new_tokens}: give 0 or more")
    if args.device is not None:
        resolve_device(args.device)
    config_json = model_config_json(args.model)
    check_layers(config, layer_count(config_json))
    force = bool(getattr(args, "force", False))
    if getattr(args, "save", None):
        check_destination(args.save, force=force, what="--save")
    if getattr(args, "patch", None):
        patch = Path(args.patch)
        if patch.is_dir():
            raise DestinationError(f"--patch {patch} is a folder: give a file path "
                                   f"(e.g. {patch / 'edit.safetensors'})")
        if patch.exists() and not force:
            raise DestinationError(f"--patch {patch} exists: choose a new file name, or pass "
                                   f"--force to replace it")
        check_destination(patch.parent / f".{patch.name}.check", what="--patch")
    return EditPlan(requests, get_method(args.method).name, overrides, config)


def context_length(model: EditableModel) -> int | None:
    """The longest input the model's position embeddings cover, where its config says."""
    config = model.model.config
    config = getattr(config, "text_config", None) or config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_prompt_lengths(model: EditableModel, requests: Sequence[EditRequest],
                         extra_tokens: int = 16) -> None:
    """Refuse a request whose prompt and target exceed the model's context (naming its index
    and field), and warn about prompts long enough to make the edit slow."""
    limit = context_length(model)
    for i, request in enumerate(requests):
        texts = {"prompt": request.rewrite_prompt + " " + request.target_new,
                 **{f"paraphrases[{j}]": p for j, p in enumerate(request.paraphrases)}}
        for where, text in texts.items():
            n = len(model.tokenizer(text, add_special_tokens=True)["input_ids"])
            if limit is not None and n + extra_tokens > limit:
                raise InvalidRequestError(
                    f"request [{i}]: {where} is {n} tokens long, beyond what {model.model_id} "
                    f"reads ({limit} tokens with {extra_tokens} for the answer): shorten it")
            if n > LONG_PROMPT_TOKENS and where == "prompt":
                log.warning("request [%d]: the prompt is %d tokens long (a fact prompt is "
                            "usually under 30): each of its edit steps costs that much more",
                            i, n)
