"""Editing methods: one file each, registered by name.

Importing this package registers every built-in method.
"""

from .alphaedit import AlphaEditConfig, AlphaEditEditor
from .base import (
    METHODS,
    ConfigError,
    Editor,
    EditResult,
    MethodConfig,
    get_method,
    list_methods,
    options_for,
    register_method,
)
from .calinet import CaliNetConfig, CaliNetEditor
from .d4s import D4SConfig, D4SEditor
from .d4s_alphaedit import D4SAlphaEditConfig, D4SAlphaEditEditor
from .finetune import FineTuneConfig, FineTuneEditor, FtMConfig
from .grace import GraceConfig, GraceEditor
from .ike import IkeConfig, IkeEditor
from .ke import KeConfig, KeEditor
from .kn import KnConfig, KnEditor
from .locate import LocateEditConfig, LocateEditor
from .mello import MelloConfig, MelloEditor
from .memit import MemitConfig, MemitEditor
from .memory import MemoryConfig, MemoryEditor
from .memprompt import MemPromptConfig, MemPromptEditor
from .mend import MendConfig, MendEditor
from .pmet import PmetConfig, PmetEditor
from .rome import RomeConfig, RomeEditor
from .serac import SeracConfig, SeracEditor
from .t_patcher import TPatcherConfig, TPatcherEditor

__all__ = [
    "METHODS", "AlphaEditConfig", "AlphaEditEditor", "CaliNetConfig", "CaliNetEditor",
    "ConfigError", "D4SAlphaEditConfig",
    "D4SAlphaEditEditor", "D4SConfig", "D4SEditor", "EditResult", "Editor", "FineTuneConfig",
    "FineTuneEditor", "FtMConfig", "GraceConfig", "GraceEditor", "IkeConfig", "IkeEditor",
    "KeConfig", "KeEditor", "KnConfig", "KnEditor", "LocateEditConfig", "LocateEditor",
    "MelloConfig", "MelloEditor", "MemPromptConfig", "MemPromptEditor", "MemitConfig", "MemitEditor", "MemoryConfig",
    "MemoryEditor", "MendConfig", "MendEditor", "MethodConfig", "PmetConfig", "PmetEditor",
    "RomeConfig", "RomeEditor", "SeracConfig", "SeracEditor", "TPatcherConfig", "TPatcherEditor", "get_method", "list_methods", "options_for", "register_method",
]
