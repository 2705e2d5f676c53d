"""Subcommands of the `factedit` CLI, one module each (each exposes `register(sub)`), and
what they share."""

from __future__ import annotations

import json
from typing import Any


def set_assignments(items: list[str] | None, example: str) -> dict[str, Any]:
    """--set FIELD=VALUE pairs; VALUE is JSON where it parses, else a bare string. ValueError
    naming the item (and showing `example`) where one is not FIELD=VALUE."""
    values: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: write FIELD=VALUE, e.g. --set {example}")
        name, value = item.split("=", 1)
        if not name.strip():
            raise ValueError(f"--set {item!r}: the field name is missing; write FIELD=VALUE, "
                             f"e.g. --set {example}")
        try:
            values[name.strip()] = json.loads(value)
        except json.JSONDecodeError:  # a bare word such as a path is a string
            values[name.strip()] = value
    return values
