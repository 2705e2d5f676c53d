"""Added FFN neurons: `base` (neurons, hooks, the patch editor) and the two methods that
place them, t_patcher and calinet."""

from .base import MEMORY_PROMPTS, PatchConfig, PatchEditor, firing_rows, neuron_output
from .calinet import CaliNetConfig, CaliNetEditor
from .t_patcher import TPatcherConfig, TPatcherEditor

__all__ = [
    "MEMORY_PROMPTS", "CaliNetConfig", "CaliNetEditor", "PatchConfig", "PatchEditor",
    "TPatcherConfig", "TPatcherEditor", "firing_rows", "neuron_output",
]
