"""Editing methods: one file each, registered by name, families in subpackages.

    locate/    rome, memit, pmet, alphaedit, d4s, d4s_alphaedit (+ their shared base)
    hypernet/  mend, ke            patches/  t_patcher, calinet
    memory/    ike, memprompt, serac, mello
    grace, finetune (ft-l, ft-m), kn beside them; `base` the registry and Editor,
    `config` the shared field validators and per-model defaults.

Importing this package registers every built-in method.
"""

from .base import (
    METHODS,
    ConfigError,
    Editor,
    EditResult,
    MethodConfig,
    MethodSpec,
    StateSize,
    Trainer,
    get_method,
    list_methods,
    options_for,
    register_method,
    trainable_methods,
)
from .finetune import FineTuneConfig, FineTuneEditor, FtMConfig
from .grace import GraceConfig, GraceEditor
from .hypernet import KeConfig, KeEditor, MendConfig, MendEditor
from .kn import KnConfig, KnEditor
from .locate import (
    AlphaEditConfig,
    AlphaEditEditor,
    D4SAlphaEditConfig,
    D4SAlphaEditEditor,
    D4SConfig,
    D4SEditor,
    LocateEditConfig,
    LocateEditor,
    MemitConfig,
    MemitEditor,
    PmetConfig,
    PmetEditor,
    RomeConfig,
    RomeEditor,
)
from .memory import (
    IkeConfig,
    IkeEditor,
    MelloConfig,
    MelloEditor,
    MemoryConfig,
    MemoryEditor,
    MemPromptConfig,
    MemPromptEditor,
    SeracConfig,
    SeracEditor,
)
from .patches import CaliNetConfig, CaliNetEditor, TPatcherConfig, TPatcherEditor
from .ultraedit import UltraEditConfig, UltraEditEditor
from .wise import WiseConfig, WiseEditor

__all__ = [
    "AlphaEditConfig", "AlphaEditEditor", "CaliNetConfig", "CaliNetEditor", "ConfigError",
    "D4SAlphaEditConfig", "D4SAlphaEditEditor", "D4SConfig", "D4SEditor", "EditResult",
    "Editor", "FineTuneConfig", "FineTuneEditor", "FtMConfig", "GraceConfig", "GraceEditor",
    "IkeConfig", "IkeEditor", "KeConfig", "KeEditor", "KnConfig", "KnEditor",
    "LocateEditConfig", "LocateEditor", "METHODS", "MelloConfig", "MelloEditor",
    "MemPromptConfig", "MemPromptEditor", "MemitConfig", "MemitEditor", "MemoryConfig",
    "MemoryEditor", "MendConfig", "MendEditor", "MethodConfig", "MethodSpec", "PmetConfig",
    "PmetEditor", "RomeConfig", "RomeEditor", "SeracConfig", "SeracEditor", "StateSize",
    "TPatcherConfig", "TPatcherEditor", "Trainer", "UltraEditConfig", "UltraEditEditor",
    "WiseConfig", "WiseEditor", "get_method", "list_methods", "options_for", "register_method",
    "trainable_methods",
]
