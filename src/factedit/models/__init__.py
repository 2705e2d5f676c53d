"""Models: loading, architecture table, activation capture."""

from .arch import ARCHITECTURES, ArchSpec, UnknownArchitectureError, resolve_arch
from .editable import EditableModel, LayerIndexError
from .hooks import StopForward, Trace, TraceDict, get_module, start_at_layer
from .loading import BUILTIN_MODELS, DEFAULT_MODEL, cache_root, load_model

__all__ = [
    "ARCHITECTURES", "ArchSpec", "BUILTIN_MODELS", "DEFAULT_MODEL", "EditableModel",
    "LayerIndexError", "StopForward", "Trace", "TraceDict", "UnknownArchitectureError",
    "cache_root", "get_module", "load_model", "resolve_arch", "start_at_layer",
]
