"""GGUF export of an (edited) model, for llama.cpp and everything that reads GGUF.

    export_gguf(model, "edited.gguf", "q8_0", base_gguf=gguf_source("smollm2-135m"))

The exact route for the families factedit loads from GGUF: copy every key-value field of the
base model's own GGUF file (tokenizer, chat template, hyperparameters: what llama.cpp needs)
and write the model's tensors under their GGUF names, undoing what `transformers` does when
it reads a GGUF file (`modeling_gguf_pytorch_utils`): for llama the rotary permutation of
attn_q / attn_k, for gemma3 the "+1" of the RMS norm weights. The HF <-> GGUF name map is the
one transformers reads with (`get_gguf_hf_weights_map`), so reading the file back gives the
model's weights again (to the chosen type's rounding). 2-D weights take the chosen type
(quantized by `gguf.quants`, as llama.cpp's converter does); 1-D tensors (norms) stay F32.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models import EditableModel
from ..models.loading import partial_path, resolve_source

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")
SUPPORTED_ARCHITECTURES = ("llama", "gemma3")
# Keys the writer sets itself (or that describe the old file's layout, not the model).
_OWN_KEYS = ("general.architecture", "general.file_type", "general.alignment")


class GGUFExportError(ValueError):
    """The model cannot be written as GGUF as asked; says the fix."""


def gguf_source(name: str) -> Path:
    """The GGUF file of a model name `--model` takes (a built-in alias or a .gguf path)."""
    kind, path = resolve_source(name)
    if kind != "gguf" or path is None:
        raise GGUFExportError(f"{name!r} is not a GGUF model: give the built-in alias or .gguf "
                              f"file the model was loaded from (e.g. --like smollm2-135m), whose "
                              f"tokenizer and metadata the export copies")
    return path


def _qtypes(qtype: str) -> tuple[Any, int]:
    from gguf import GGMLQuantizationType as Q
    from gguf import LlamaFileType as F

    table = {"f32": (Q.F32, F.ALL_F32), "f16": (Q.F16, F.MOSTLY_F16),
             "bf16": (Q.BF16, F.MOSTLY_BF16), "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0),
             "q4_0": (Q.Q4_0, F.MOSTLY_Q4_0), "q4_1": (Q.Q4_1, F.MOSTLY_Q4_1)}
    if qtype not in table:
        raise GGUFExportError(f"--type {qtype!r}: choose one of {', '.join(GGUF_TYPES)}")
    return table[qtype]


def permute_rotary(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's permutation of a Llama q/k projection (convert_hf_to_gguf `permute`), the
    inverse of transformers' `LlamaTensorProcessor._reverse_permute_weights`."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _to_gguf_layout(arch: str, gguf_name: str, weights: np.ndarray, config: Any) -> np.ndarray:
    if arch == "llama" and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
        heads = config.num_attention_heads
        kv = heads if ".attn_q." in gguf_name else config.num_key_value_heads
        return permute_rotary(weights, heads, kv)
    if arch == "gemma3" and "norm.weight" in gguf_name:
        return weights + 1  # transformers subtracts 1 on read (Gemma2TensorProcessor)
    return weights


def _hf_names(model: EditableModel, arch: str) -> dict[str, str]:
    """GGUF tensor name -> HF parameter name, by gguf's tensor name map, as transformers'
    `get_gguf_hf_weights_map` maps them when it reads (one map for the whole model: that
    function builds one per submodule, 20 s for SmolLM2)."""
    import gguf

    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    table = gguf.get_tensor_name_map(arch_id, model.model.config.num_hidden_layers)
    names = {}
    for hf_name in model.model.state_dict():
        stem, dot, suffix = hf_name.rpartition(".")
        if suffix not in ("weight", "bias"):
            stem, dot, suffix = hf_name, "", ""
        gguf_name = table.get_name(stem)
        if gguf_name is not None:
            names.setdefault(gguf_name + dot + suffix, hf_name)
    return names


def _field_value(field: Any) -> tuple[Any, Any, Any]:
    from gguf import GGUFValueType

    main = field.types[0]
    sub = field.types[-1] if main == GGUFValueType.ARRAY else None
    return field.contents(), main, sub


def _check_fits(reader: Any, arch: str, model: EditableModel) -> None:
    config = model.model.config
    expected = {f"{arch}.block_count": config.num_hidden_layers,
                f"{arch}.embedding_length": config.hidden_size}
    for key, value in expected.items():
        field = reader.fields.get(key)
        if field is not None and int(field.contents()) != int(value):
            raise GGUFExportError(f"the base GGUF file has {key}={field.contents()}, the model "
                                  f"{value}: give the GGUF file this model was loaded from")


@functools.lru_cache(maxsize=2)
def _read_base(path: str, mtime_ns: int) -> Any:
    """The base GGUF file, parsed once per process (gguf's reader takes seconds on the
    tokenizer arrays; the tensors stay memory-mapped). Keyed by mtime: a changed file is read again."""
    import gguf

    return gguf.GGUFReader(path)


def export_gguf(model: EditableModel, out: str | Path, qtype: str = "f16", *,
                base_gguf: str | Path, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write `model` (edited or not) as a GGUF file at `out` (temporary sibling + rename).

    `base_gguf`: the GGUF file the model was loaded from; its key-value fields (tokenizer,
    chat template, hyperparameters) are copied. `metadata`: extra JSON written under the key
    "factedit.export" (which patches were applied; llama.cpp ignores unknown keys).
    Returns {"path", "type", "bytes", "tensors": {gguf name: type}}.
    """
    import gguf

    qt, file_type = _qtypes(qtype)
    out = Path(out)
    reader = _read_base(str(base_gguf), Path(base_gguf).stat().st_mtime_ns)
    arch_field = reader.fields.get("general.architecture")
    arch = str(arch_field.contents()) if arch_field is not None else "?"
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFExportError(f"GGUF export knows the architectures factedit loads from GGUF "
                              f"({', '.join(SUPPORTED_ARCHITECTURES)}); {base_gguf} is {arch!r}")
    _check_fits(reader, arch, model)
    names = _hf_names(model, arch)
    state = model.model.state_dict()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(out)
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key in _OWN_KEYS:
                continue
            value, main, sub = _field_value(field)
            writer.add_key_value(key, value, main, sub_type=sub)
        writer.add_file_type(int(file_type))
        if metadata:
            writer.add_string("factedit.export", json.dumps(metadata, sort_keys=True))
        types: dict[str, str] = {}
        for tensor in reader.tensors:
            hf_name = names.get(tensor.name)
            if hf_name is None or hf_name not in state:
                # Not a model parameter (e.g. rope_freqs): copied as the base file holds it.
                writer.add_tensor(tensor.name, np.asarray(tensor.data), raw_dtype=tensor.tensor_type)
                types[tensor.name] = tensor.tensor_type.name
                continue
            weights = state[hf_name].detach().to("cpu", torch.float32).numpy()
            weights = _to_gguf_layout(arch, tensor.name, weights, model.model.config)
            want = qt if weights.ndim >= 2 else gguf.GGMLQuantizationType.F32
            block = gguf.GGML_QUANT_SIZES[want][0]
            if weights.shape[-1] % block:  # rows the block type cannot hold: F16 instead
                want = gguf.GGMLQuantizationType.F16
            data = gguf.quants.quantize(np.ascontiguousarray(weights), want)
            writer.add_tensor(tensor.name, data, raw_dtype=want)
            types[tensor.name] = want.name
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(out)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return {"path": str(out), "type": qtype, "bytes": out.stat().st_size, "tensors": types}
