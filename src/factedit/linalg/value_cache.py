"""Target values on disk: a resumed run or a sweep over solve settings skips the Adam steps.

Target values are the expensive part of a locate-then-edit edit (~2 s per request on two
CPU cores against ~0.5 s for the solve), and where they are computed ahead (single mode, D4S
on W_0) they depend only on the model's weights, the request and the value options, not on
lambda, the layers below the value layer, or the edits made before. So `prepare` can keep
them: one safetensors file per request (delta, init; steps and final NLL in the metadata)
under $FACTEDIT_CACHE/values/<model id>/<setting>/, where <setting> is a digest of

- every parameter of the model as the values were computed on it (so an edited model, a
  resumed D4S on W_0, or another checkpoint under the same id never share values wrongly),
- the model's dtype, the value layer and site, the context templates and every option of the
  optimisation (steps, learning rate, decay, clamp, KL factor, early stop, method).

The file name is a digest of the request (uid, prompt, subject, target_new). Each file carries
a digest of its own tensors; a file that does not match is recomputed with a warning.
Values optimised in a batch equal values optimised alone only to rounding (linalg.values), so
a hit may differ in the last bits from what a fresh batch would give.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..models import EditableModel
from ..models.loading import cache_root, partial_path
from ..requests import EditRequest
from .values import TargetValues


def model_digest(model: EditableModel) -> str:
    """blake2b over every parameter's name and bytes (parameters offloaded to meta skipped)."""
    h = hashlib.blake2b(digest_size=16)
    for name, param in model.model.named_parameters():
        if param.device.type == "meta":
            continue
        h.update(name.encode())
        h.update(param.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _tensors_digest(delta: torch.Tensor, init: torch.Tensor) -> str:
    h = hashlib.blake2b(digest_size=16)
    for t in (delta, init):
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _usable_device(name: str) -> torch.device:
    """The device the values were computed on, or the CPU where this machine lacks it."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        return torch.device("cpu")
    return device


class ValueCache:
    """The target values of one setting (model weights + value options), one file a request."""

    def __init__(self, model: EditableModel, setting: dict[str, Any]) -> None:
        described = json.dumps({**setting, "weights": model_digest(model),
                                "dtype": str(model.dtype)}, sort_keys=True, default=str)
        self.folder = (cache_root() / "values" / model.model_id
                       / hashlib.blake2b(described.encode(), digest_size=12).hexdigest())

    @staticmethod
    def request_name(request: EditRequest) -> str:
        fields = json.dumps([request.uid, request.prompt, request.subject, request.target_new])
        return hashlib.blake2b(fields.encode(), digest_size=16).hexdigest()

    def path(self, request: EditRequest) -> Path:
        return self.folder / f"{self.request_name(request)}.safetensors"

    def load(self, request: EditRequest) -> TargetValues | None:
        """The stored values of `request`, or None (absent, or corrupt: then with a warning)."""
        path = self.path(request)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
            delta, init = tensors["delta"], tensors["init"]
            if meta.get("digest") != _tensors_digest(delta, init):
                raise ValueError("digest mismatch")
            device = _usable_device(meta.get("device", "cpu"))
            return TargetValues(int(meta["layer"]), meta["site"], delta.to(device),
                                init.to(device), json.loads(meta["final_nll"]),
                                json.loads(meta["steps"]))
        except Exception as err:  # noqa: BLE001 - any unreadable entry is recomputed
            warnings.warn(f"target-value cache {path} is corrupt ({err}); recomputing it",
                          stacklevel=2)
            return None

    def save(self, request: EditRequest, values: TargetValues) -> None:
        """Store one request's values (atomically: a killed write leaves no half file)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        delta = values.delta.detach().to("cpu").contiguous()
        init = values.init.detach().to("cpu").contiguous()
        path = self.path(request)
        tmp = partial_path(path)
        save_file({"delta": delta, "init": init}, str(tmp), metadata={
            "digest": _tensors_digest(delta, init), "layer": str(values.layer),
            "site": values.site, "final_nll": json.dumps(values.final_nll),
            "steps": json.dumps(values.steps), "device": str(values.delta.device)})
        tmp.replace(path)

    def load_many(self, requests: Sequence[EditRequest]) -> dict[int, TargetValues]:
        """Index in `requests` -> stored values, for the requests that have them."""
        found = {}
        for i, request in enumerate(requests):
            values = self.load(request)
            if values is not None:
                found[i] = values
        return found
