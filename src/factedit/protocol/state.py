"""Save and resume an editing run: one safetensors file + one JSON manifest, never pickle.

    state.safetensors   weights/<param>    the edited weights as they are now
                        originals/<param>  W_0 of the same weights (restore() needs them)
                        editor/<name>      the method's own state (D4S's sums, C, history;
                                           GRACE's codebook; the memory of IKE / MemPrompt)
    manifest.json       format, factedit version, model id, method config, edit records,
                        the editor's JSON state, and the blake2b digest of state.safetensors

Resuming checks the digest (a corrupt file is refused, not guessed at) and that the model's
weights are the saved W_0 (a fresh load) or already the saved edited weights.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from .._version import __version__
from ..models import EditableModel, read_param, write_param
from ..models.loading import file_digest

if TYPE_CHECKING:
    from ..methods import Editor
    from .handle import EditHandle

FORMAT = 1
WEIGHTS_FILE = "state.safetensors"
MANIFEST_FILE = "manifest.json"


class StateFileError(ValueError):
    """A saved editing state is missing, corrupt or belongs to other weights."""


class UnreadableStateError(StateFileError):
    """The state's files are missing, unreadable or fail their checksum: raised before any
    weight of the model is touched, so the sequence can be edited again from the start."""


def save_handle(handle: EditHandle, folder: str | Path) -> Path:
    """Write `handle`'s state to `folder` (state.safetensors + manifest.json, module
    docstring); both are written to temporary names and renamed, so a crash keeps the old state."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, editor_manifest = editor_state(handle.editor)
    for name, original in handle.originals.items():
        tensors[f"originals/{name}"] = original.detach().cpu().contiguous()
        tensors[f"weights/{name}"] = read_param(handle.model.model, name).cpu().contiguous()
    # Write to temporary names, then rename: a crash mid-save leaves the old state intact.
    tmp_weights = folder / (WEIGHTS_FILE + ".partial")
    save_file(tensors, str(tmp_weights))
    manifest = {
        "format": FORMAT,
        "factedit_version": __version__,
        "model_id": handle.model.model_id,
        "method": handle.method,
        "config": handle.config.to_dict(),
        "records": [dataclasses.asdict(r) for r in handle.records],
        "editor": editor_manifest,
        "weights_file": WEIGHTS_FILE,
        "weights_blake2b": file_digest(tmp_weights),
    }
    tmp_manifest = folder / (MANIFEST_FILE + ".partial")
    tmp_manifest.write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str))
    tmp_weights.replace(folder / WEIGHTS_FILE)
    tmp_manifest.replace(folder / MANIFEST_FILE)
    return folder


def editor_state(editor: Editor) -> tuple[dict[str, torch.Tensor], dict]:
    """The editor's `state_dict()` as a saved state holds it: tensors under "editor/"
    (detached, on the CPU, contiguous) and the JSON manifest. Patch files reuse it."""
    tensors, manifest = editor.state_dict()
    return {f"editor/{n}": t.detach().cpu().contiguous() for n, t in tensors.items()}, manifest


def group_tensors(tensors: dict[str, torch.Tensor], groups: tuple[str, ...]
                  ) -> dict[str, dict[str, torch.Tensor]]:
    """{"group/name": t} -> {group: {name: t}}; every group in `groups` present (maybe empty)."""
    out: dict[str, dict[str, torch.Tensor]] = {g: {} for g in groups}
    for key, t in tensors.items():
        group, name = key.split("/", 1)
        out.setdefault(group, {})[name] = t
    return out


def read_state(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(manifest, tensors) of a saved state, after checking the digest."""
    folder = Path(folder)
    manifest_path, weights_path = folder / MANIFEST_FILE, folder / WEIGHTS_FILE
    if not manifest_path.is_file() or not weights_path.is_file():
        raise UnreadableStateError(f"{folder} has no {MANIFEST_FILE} + {WEIGHTS_FILE}: not a "
                                   f"saved editing state (write one with handle.save(folder))")
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as err:
        raise UnreadableStateError(f"{manifest_path} is not valid JSON ({err})") from None
    if manifest.get("format") != FORMAT:
        raise StateFileError(f"{manifest_path}: format {manifest.get('format')!r}, this "
                             f"factedit reads format {FORMAT}")
    if file_digest(weights_path) != manifest.get("weights_blake2b"):
        raise UnreadableStateError(f"{weights_path} does not match the checksum in its "
                                   f"manifest: the file is corrupt or was changed; re-run the "
                                   f"edits")
    return manifest, load_file(str(weights_path))


def check_state_model(manifest: dict, model: EditableModel, folder: str | Path) -> None:
    """StateFileError unless the state in `folder` was made on `model`'s checkpoint."""
    if manifest["model_id"] != model.model_id:
        raise StateFileError(f"state in {folder} was made on model {manifest['model_id']!r}, "
                             f"not {model.model_id!r}")


def load_state_into(handle: EditHandle, manifest: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write a saved state's weights into `handle.model`, its originals into the handle and
    its editor state into `handle.editor` (a fresh editor built from the saved config).

    The handle's records and attachment are the caller's (`EditHandle.resume`).
    """
    model, editor = handle.model, handle.editor
    groups = group_tensors(tensors, ("originals", "weights", "editor"))
    for name, original in groups["originals"].items():
        saved = groups["weights"][name]
        live = read_param(model.model, name)  # offloaded weights included (models.params)
        current = live.cpu()
        if not (torch.equal(current, original.to(current.dtype))
                or torch.equal(current, saved.to(current.dtype))):
            raise StateFileError(f"{name} of this model is neither the saved original nor "
                                 f"the saved edited weight: resume on the model the run "
                                 f"started from")
        handle.originals[name] = original.to(live.device, live.dtype)
        write_param(model.model, name, saved)
    editor.load_state_dict(groups["editor"], manifest["editor"])
