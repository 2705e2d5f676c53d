"""Editing methods: one file each, registered by name.

Importing this package registers every built-in method.
"""

from .base import (
    METHODS,
    ConfigError,
    Editor,
    EditResult,
    MethodConfig,
    get_method,
    list_methods,
    register_method,
)
from .locate import LocateEditConfig, LocateEditor
from .rome import RomeConfig, RomeEditor

__all__ = [
    "METHODS", "ConfigError", "EditResult", "Editor", "LocateEditConfig", "LocateEditor",
    "MethodConfig", "RomeConfig", "RomeEditor", "get_method", "list_methods", "register_method",
]
