"""Patch files: an edit as one small safetensors file that travels (see `core`), and the
GGUF export of edited models for llama.cpp (`gguf`).

    from factedit.patch import Patch, PatchError
    patch = Patch.from_handle(handle, requests, scores); patch.save("edit.safetensors")
    Patch.load("edit.safetensors").apply(model); patch.revert(model)
    Patch.diff(base_model, edited_model)          # any two models -> a patch
"""

from .core import FORMAT_VERSION, Patch, PatchError, encode_delta, sketch

__all__ = ["FORMAT_VERSION", "Patch", "PatchError", "encode_delta", "sketch"]
