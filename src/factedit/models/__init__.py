"""Models: loading, architecture table, activation capture."""

from .arch import ARCHITECTURES, ArchSpec, UnknownArchitectureError, resolve_arch
from .editable import EditableModel, LayerIndexError
from .hooks import StopForward, Trace, TraceDict, get_module, start_at_layer
from .loading import BUILTIN_MODELS, DEFAULT_MODEL, cache_root, load_model, resolve_device
from .params import frozen, is_offloaded, onloaded, param_device, read_param, write_param

__all__ = [
    "ARCHITECTURES", "ArchSpec", "BUILTIN_MODELS", "DEFAULT_MODEL", "EditableModel",
    "LayerIndexError", "StopForward", "Trace", "TraceDict", "UnknownArchitectureError",
    "cache_root", "frozen", "get_module", "is_offloaded", "load_model",
    "onloaded", "param_device", "read_param", "resolve_arch", "resolve_device", "start_at_layer",
    "write_param",
]
