"""Editors that keep their edits beside the weights and retrieve them: `base` (the
retrieve-then-prepend attachment of ike and memprompt), serac (scope classifier and
counterfactual model), mello (multi-hop question decomposition), and `sentence`, the
sentence embedder serac and mello retrieve with."""

from .base import MemoryConfig, MemoryEditor
from .ike import IkeConfig, IkeEditor
from .mello import MelloConfig, MelloEditor
from .memprompt import MemPromptConfig, MemPromptEditor
from .serac import SeracConfig, SeracEditor

__all__ = [
    "IkeConfig", "IkeEditor", "MelloConfig", "MelloEditor", "MemPromptConfig",
    "MemPromptEditor", "MemoryConfig", "MemoryEditor", "SeracConfig", "SeracEditor",
]
