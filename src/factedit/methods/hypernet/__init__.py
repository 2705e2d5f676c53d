"""The hypernetwork editors: `base` (the edited forward, gradient pieces, the resumable
training loop) and the two networks built on it, mend and ke."""

from .base import (
    EditedForward,
    EditSuccess,
    HypernetConfig,
    HypernetEditor,
    TrainConfig,
    train_editor,
    train_hypernetwork,
)
from .ke import KeConfig, KeEditor, train_ke
from .mend import MendConfig, MendEditor, train_mend

__all__ = [
    "EditSuccess", "EditedForward", "HypernetConfig", "HypernetEditor", "KeConfig", "KeEditor",
    "MendConfig", "MendEditor", "TrainConfig", "train_editor", "train_hypernetwork", "train_ke",
    "train_mend",
]
