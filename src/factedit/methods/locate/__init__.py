"""The locate-then-edit family: `base` (the shared config and editor plumbing) and one small
file per member's update rule (rome, memit, pmet, alphaedit, d4s, d4s_alphaedit)."""

from .alphaedit import AlphaEditConfig, AlphaEditEditor
from .base import LayerSolve, LocateEditConfig, LocateEditor, SystemMatrix
from .d4s import D4SConfig, D4SEditor
from .d4s_alphaedit import D4SAlphaEditConfig, D4SAlphaEditEditor
from .memit import MemitConfig, MemitEditor
from .pmet import PmetConfig, PmetEditor
from .rome import RomeConfig, RomeEditor

__all__ = [
    "AlphaEditConfig", "AlphaEditEditor", "D4SAlphaEditConfig", "D4SAlphaEditEditor",
    "D4SConfig", "D4SEditor", "LayerSolve", "LocateEditConfig", "LocateEditor", "MemitConfig",
    "MemitEditor", "PmetConfig", "PmetEditor", "RomeConfig", "RomeEditor", "SystemMatrix",
]
