"""Patch: an edit as one small file that travels (safetensors tensors + JSON header metadata).

    patch = Patch.from_handle(handle, requests, scores)   # after fe.edit(model, requests, ...)
    patch.save("eiffel.safetensors")                     # atomic: temporary sibling + rename
    Patch.load("eiffel.safetensors").apply(model)         # refuses another base model
    patch.revert(model)                                   # back to the base

File layout (one safetensors file, never pickle):

    delta_u/<param>, delta_v/<param>  low-rank factors, delta = u @ v (u: d_out x r, v: r x d_in)
    delta/<param>                     the delta itself, where low rank would not be smaller
    sketch/<param>                    the base fingerprint's sketch of the base weight (float64)
    editor/<name>                     a weight-keeping editor's state (grace's codebook, the
                                      memory of ike/memprompt/serac, t-patcher's neurons);
                                      written by `protocol.state.editor_state`
  header metadata (strings, as safetensors keeps them):
    "factedit.patch"           the JSON description (`describe()` shows it)
    "factedit.patch.blake2b"   digest of that JSON and of every tensor (name, dtype, shape,
                               bytes): a truncated or changed file is refused on load

The base fingerprint is the digest of the model config plus, per touched weight, a sketch
s = W_0 @ g (g a fixed random vector). An exact digest of the weights would refuse a model
whose weights differ by one rounding (a base rebuilt by applying an earlier patch), while a
sketch tells such a model from a different checkpoint or an already-patched one: those differ
by orders of magnitude more than the tolerance. The exact digest is kept as well and
`check_base` says whether it matched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .._version import __version__
from ..models import EditableModel, read_param, write_param
from ..models.attach import Attachment
from ..models.loading import partial_path
from ..protocol import make_editor
from ..protocol.state import editor_state, group_tensors
from ..requests import EditRequest, as_requests

if TYPE_CHECKING:
    from ..methods import Editor
    from ..protocol import EditHandle

FORMAT = "factedit-patch"
FORMAT_VERSION = 1
META_KEY = "factedit.patch"
DIGEST_KEY = "factedit.patch.blake2b"
SKETCH_SEED = 20261207
STORE_DTYPES = ("float32", "float64", "float16", "bfloat16", "weight")
# Config fields that say how a model was loaded or saved, not which model it is.
# (architectures: None on a model built from a config, the class name once saved.)
_VOLATILE_CONFIG = {"transformers_version", "torch_dtype", "dtype", "quantization_config",
                    "use_cache", "architectures"}


class PatchError(ValueError):
    """A patch file is unreadable, corrupt, or does not fit the model; says the fix."""


# -- fingerprints ----------------------------------------------------------------------------
def config_digest(model: EditableModel) -> str:
    """sha256 of the model config, without the fields that only say how it was loaded."""
    config = {k: v for k, v in model.model.config.to_dict().items()
              if k not in _VOLATILE_CONFIG and not k.startswith("_")}
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _probe(n: int) -> torch.Tensor:
    """The fixed random vector g of length n that sketches are taken with (float64)."""
    generator = torch.Generator().manual_seed(SKETCH_SEED + n)
    return torch.randn(n, generator=generator, dtype=torch.float64)


def sketch(weight: torch.Tensor) -> torch.Tensor:
    """s = W @ g in float64, along the longer side (a 49152 x 576 embedding gives 576
    numbers, not 49152); a 1-D weight is its own sketch."""
    w = weight.detach().cpu().double()
    if w.dim() <= 1:
        return w.reshape(-1).clone()
    w = w.reshape(w.shape[0], -1)
    if w.shape[0] > w.shape[1]:
        w = w.T
    return w @ _probe(w.shape[1])


def sketch_tolerance(dtype: torch.dtype) -> float:
    """Relative difference of a sketch still taken as the same base: a few roundings of the
    weight dtype (and the error a low-rank factor records), far below what another
    checkpoint or one more edit changes (1e-3 and up)."""
    return max(1e-5, 4 * torch.finfo(dtype).eps)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _digest(meta_text: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.blake2b()
    h.update(meta_text.encode())
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"\0{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def _dtype(name: str) -> torch.dtype:
    value = getattr(torch, name.replace("torch.", ""), None)
    if not isinstance(value, torch.dtype):
        raise PatchError(f"dtype {name!r} is not a torch dtype")
    return value


# -- deltas in their most compact exact form ----------------------------------------------------
def encode_delta(name: str, base: torch.Tensor, edited: torch.Tensor, dtype: str = "float32",
                 rank_tol: float = 1e-6) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(tensors, description) of edited - base: low-rank factors where that is smaller than
    the dense delta, else dense; None where the weight did not change.

    The rank counts the singular values of the float64 delta above `rank_tol` times the
    largest one and above the rounding noise of the weight's dtype (a float32 weight edited
    by a rank-one update differs from W_0 by the update plus one rounding per entry, which
    has full rank but is no part of the edit). The description records the reconstruction
    error of the stored form (in float64, after the cast to the stored dtype).
    """
    if dtype not in STORE_DTYPES:
        raise PatchError(f"dtype={dtype!r}: choose one of {', '.join(STORE_DTYPES)} "
                         f"(\"weight\": the weight's own dtype)")
    if rank_tol < 0:
        raise PatchError(f"rank_tol={rank_tol}: give a tolerance >= 0 (default 1e-6)")
    if base.shape != edited.shape:
        raise PatchError(f"{name}: base shape {tuple(base.shape)} and edited shape "
                         f"{tuple(edited.shape)} differ")
    store = base.dtype if dtype == "weight" else _dtype(dtype)
    b, e = base.detach().cpu().double(), edited.detach().cpu().double()
    delta = e - b
    if not bool(delta.any()):
        return None
    info: dict[str, Any] = {"shape": list(base.shape), "base_dtype": str(base.dtype).replace("torch.", ""),
                            "stored_dtype": str(store).replace("torch.", ""),
                            "delta_fro": float(delta.norm())}
    tensors: dict[str, torch.Tensor]
    if delta.dim() == 2 and min(delta.shape) > 1:
        m, n = delta.shape
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        rms = float(e.pow(2).mean().sqrt())
        noise = 2 * torch.finfo(base.dtype).eps * rms * (m ** 0.5 + n ** 0.5)
        threshold = max(rank_tol * float(S[0]), noise)
        rank = int((S > threshold).sum())
        if rank * (m + n) < m * n:
            root = S[:rank].sqrt()  # split evenly: neither factor's range blows up in float16
            u = (U[:, :rank] * root).to(store).contiguous()
            v = (root[:, None] * Vh[:rank]).to(store).contiguous()
            tensors = {f"delta_u/{name}": u, f"delta_v/{name}": v}
            approx = u.double() @ v.double()
            info.update(form="lowrank", rank=rank,
                        dropped_singular_value=float(S[rank]) if rank < len(S) else 0.0)
        else:
            tensors = {f"delta/{name}": delta.to(store).contiguous()}
            approx = tensors[f"delta/{name}"].double()
            info.update(form="dense", rank=int(min(m, n)) if rank == min(m, n) else rank)
    else:
        tensors = {f"delta/{name}": delta.to(store).contiguous()}
        approx = tensors[f"delta/{name}"].double()
        info.update(form="dense")
    error = float((delta - approx).norm())
    info.update(error_fro=error, relative_error=error / info["delta_fro"],
                bytes=sum(t.numel() * t.element_size() for t in tensors.values()))
    return tensors, info


# -- the patch -------------------------------------------------------------------------------
@dataclasses.dataclass
class _Installed:
    editor: Editor
    attachment: Attachment | None


class Patch:
    """One edit (or a sequence of them) as a file: see the module docstring.

    Build with `from_handle` (after `fe.edit`) or `diff` (any two models), read with `load`.
    """

    def __init__(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.meta = meta
        self.tensors = tensors
        groups = group_tensors(tensors, ("delta", "delta_u", "delta_v", "sketch", "editor"))
        self._dense, self._u, self._v = groups["delta"], groups["delta_u"], groups["delta_v"]
        self._sketch, self._editor = groups["sketch"], groups["editor"]

    # -- building --------------------------------------------------------------------------
    @classmethod
    def from_handle(cls, handle: EditHandle, requests: Sequence[EditRequest] | None = None,
                    scores: dict[str, Any] | None = None, dtype: str = "float32",
                    rank_tol: float = 1e-6) -> Patch:
        """The patch of everything `handle` changed in its model (its live edits).

        Weight editors: the change of every touched weight (`handle.originals` against the
        weights now). Editors that keep the weights (grace, t-patcher, calinet, serac, ike,
        memprompt, mello): their state, which only factedit can apply (it installs hooks).
        `requests`: the edit requests (stored with their ids); `scores`: metrics measured at
        creation (`fe.evaluate`'s means; per-request rows are left out).
        """
        live = [r for r in handle.records if not r.removed]
        if not live:
            raise PatchError("the handle holds no edits: edit first (fe.edit(...)), then "
                             "build the patch")
        model = handle.model
        tensors: dict[str, torch.Tensor] = {}
        weights: dict[str, Any] = {}
        for name, original in handle.originals.items():
            encoded = encode_delta(name, original, read_param(model.model, name), dtype, rank_tol)
            if encoded is not None:
                tensors.update(encoded[0])
                weights[name] = encoded[1]
        editor_meta = None
        if not handle.originals:  # the editor keeps the weights: its state is the edit
            editor_tensors, manifest = editor_state(handle.editor)
            if manifest.get("stateless"):
                raise PatchError(f"the handle's model holds no edit of method "
                                 f"{handle.method!r} (mode 'single' restores the weights after "
                                 f"each edit): edit in mode batch or sequential to get a patch")
            tensors.update(editor_tensors)
            editor_meta = manifest
        ids = [i for r in live for i in r.request_ids]
        reqs = as_requests(requests) if requests is not None else []
        meta = {
            "method": handle.method, "config": handle.config.to_dict(),
            "edits": len(live), "request_ids": ids,
            "requests": [{"id": r.uid, **r.to_dict()} for r in reqs],
            "scores": _jsonable({k: v for k, v in (scores or {}).items() if k != "per_request"}),
            "editor": editor_meta,
        }
        fingerprint = list(handle.originals) or [model.arch.embed + ".weight"]
        base = {name: handle.originals.get(name, None) for name in fingerprint}
        return cls._build(model, meta, tensors, weights, base, dtype, rank_tol)

    @classmethod
    def diff(cls, base_model: EditableModel, edited_model: EditableModel,
             rank_tol: float = 1e-6, dtype: str = "float32") -> Patch:
        """The patch that turns `base_model` into `edited_model` (any two models of one
        architecture and shapes: edited by factedit, another tool or by hand).

        Only parameters that differ are stored, each in its most compact form (a ROME edit
        comes back as rank one). Tied parameters count once."""
        if config_digest(base_model) != config_digest(edited_model):
            raise PatchError("the two models have different configs: a diff needs the same "
                             "architecture and shapes (give the base the edit was made on)")
        edited = dict(edited_model.model.named_parameters())
        tensors: dict[str, torch.Tensor] = {}
        weights: dict[str, Any] = {}
        base_values: dict[str, torch.Tensor | None] = {}
        for name, _ in base_model.model.named_parameters():
            if name not in edited:
                raise PatchError(f"the edited model has no parameter {name!r}")
            b, e = read_param(base_model.model, name), read_param(edited_model.model, name)
            if b.dtype != e.dtype:
                raise PatchError(f"{name}: base dtype {b.dtype} and edited dtype {e.dtype} "
                                 f"differ; load both in one dtype")
            if torch.equal(b, e):
                continue
            encoded = encode_delta(name, b, e, dtype, rank_tol)
            if encoded is not None:
                tensors.update(encoded[0])
                weights[name] = encoded[1]
                base_values[name] = b
        if not weights:
            raise PatchError("the two models have equal weights: nothing to put in a patch")
        meta = {"method": "diff", "config": {"rank_tol": rank_tol, "dtype": dtype,
                                             "edited_model_id": edited_model.model_id},
                "edits": 0, "request_ids": [], "requests": [], "scores": {}, "editor": None}
        return cls._build(base_model, meta, tensors, weights, base_values, dtype, rank_tol)

    @classmethod
    def _build(cls, model: EditableModel, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
               weights: dict[str, Any], base: dict[str, torch.Tensor | None], dtype: str,
               rank_tol: float) -> Patch:
        params = {}
        for name, value in base.items():
            value = read_param(model.model, name) if value is None else value
            tensors[f"sketch/{name}"] = sketch(value)
            params[name] = {"shape": list(value.shape),
                            "dtype": str(value.dtype).replace("torch.", "")}
        needs_factedit = meta["editor"] is not None
        full = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "factedit_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "kind": "editor-state" if needs_factedit else "weights",
            "needs_factedit": needs_factedit,
            "base": {"model_id": model.model_id, "config_sha256": config_digest(model),
                     "model_type": model.model.config.model_type, "params": params,
                     "sketch_seed": SKETCH_SEED},
            "dtype": dtype, "rank_tol": rank_tol, "weights": weights, **meta,
        }
        if not needs_factedit:
            # Digest of the base values as they were (exact): `check_base` reports a match.
            full["base"]["weights_blake2b"] = _exact_base_digest(base, model)
        return cls(json.loads(json.dumps(full, default=str)), tensors)

    # -- file ------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The file's content: safetensors with the JSON description in its header."""
        text = json.dumps(self.meta, sort_keys=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}
        return save_safetensors(tensors, metadata={META_KEY: text,
                                                   DIGEST_KEY: _digest(text, tensors)})

    def save(self, path: str | Path) -> Path:
        """Write the patch to `path` (a temporary sibling renamed into place: no half file)."""
        path = Path(path)
        if path.is_dir():
            raise PatchError(f"{path} is a folder: give a file name, e.g. {path}/edit.safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = partial_path(path)
        try:
            tmp.write_bytes(self.to_bytes())
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Patch:
        """Read and verify a patch file: format version, digest of the description and of
        every tensor, and that the stored tensors fit the shapes the description gives."""
        path = Path(path)
        if not path.is_file():
            raise PatchError(f"patch file {path} does not exist")
        return cls.from_bytes(path.read_bytes(), source=str(path))

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "patch") -> Patch:
        """`load` on bytes in memory (what `to_bytes` wrote)."""
        meta_text, digest = _read_header(data, source)
        try:
            tensors = load_safetensors(data)
        except (SafetensorError, ValueError, RuntimeError) as err:
            raise PatchError(f"{source}: the tensor data is unreadable ({err}); the file is "
                             f"truncated or corrupt: copy it again") from None
        if _digest(meta_text, tensors) != digest:
            raise PatchError(f"{source}: the content does not match its checksum: the file "
                             f"was changed or damaged after it was written; copy it again")
        meta = json.loads(meta_text)
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise PatchError(f"{source}: format {meta.get('format')!r} version "
                             f"{meta.get('format_version')!r}; this factedit "
                             f"({__version__}) reads {FORMAT} version {FORMAT_VERSION}")
        patch = cls(meta, tensors)
        patch._check_shapes(source)
        return patch

    def _check_shapes(self, source: str) -> None:
        for name, info in self.meta["weights"].items():
            shape = tuple(info["shape"])
            if info["form"] == "lowrank":
                u, v = self._u.get(name), self._v.get(name)
                ok = (u is not None and v is not None and u.dim() == 2 and v.dim() == 2
                      and (u.shape[0], v.shape[1]) == shape and u.shape[1] == v.shape[0]
                      == info["rank"])
            else:
                ok = name in self._dense and tuple(self._dense[name].shape) == shape
            if not ok:
                raise PatchError(f"{source}: the stored delta of {name} does not have the "
                                 f"shape {shape} its description gives: corrupt patch")

    # -- facts -----------------------------------------------------------------------------
    @property
    def id(self) -> str:
        """A short content digest: which patch this is."""
        text = json.dumps(self.meta, sort_keys=True)
        return _digest(text, self.tensors)[:16]

    @property
    def needs_factedit(self) -> bool:
        return bool(self.meta["needs_factedit"])

    @property
    def method(self) -> str:
        return self.meta["method"]

    @property
    def base_dtype(self) -> str:
        """The dtype of the base weights the patch was made on ("float32", ...): load the
        base in it (`fe.load_model(name, dtype=patch.base_dtype)`)."""
        return next(iter(self.meta["base"]["params"].values()))["dtype"]

    @property
    def requests(self) -> list[EditRequest]:
        return [EditRequest.from_dict({k: v for k, v in r.items() if k != "id"})
                for r in self.meta["requests"]]

    def delta(self, name: str) -> torch.Tensor:
        """The stored change of weight `name` as a dense float64 tensor."""
        if name in self._dense:
            return self._dense[name].double()
        return self._u[name].double() @ self._v[name].double()

    def describe(self) -> dict[str, Any]:
        """What the patch changes, on which base, which facts, sizes (`factedit patch inspect`)."""
        meta = self.meta
        weights = {name: {k: info.get(k) for k in ("shape", "form", "rank", "stored_dtype",
                                                  "bytes", "delta_fro", "relative_error")}
                   for name, info in meta["weights"].items()}
        dense_bytes = sum(torch.Size(info["shape"]).numel() * _dtype(info["base_dtype"]).itemsize
                          for info in meta["weights"].values())
        return {
            "id": self.id, "format_version": meta["format_version"],
            "factedit_version": meta["factedit_version"], "created": meta["created"],
            "kind": meta["kind"], "needs_factedit": meta["needs_factedit"],
            "method": meta["method"], "config": meta["config"], "edits": meta["edits"],
            "base": {k: meta["base"][k] for k in ("model_id", "model_type", "config_sha256")}
            | {"fingerprint_params": sorted(meta["base"]["params"])},
            "weights": weights,
            "editor_tensors": {n: list(t.shape) for n, t in self._editor.items()},
            "requests": [{k: r.get(k) for k in ("id", "prompt", "subject", "target_new",
                                                "target_true")} for r in meta["requests"]],
            "request_ids": meta["request_ids"], "scores": meta["scores"],
            "sizes": {"tensor_bytes": sum(t.numel() * t.element_size()
                                          for t in self.tensors.values()),
                      "dense_delta_bytes": dense_bytes},
        }

    # -- applying --------------------------------------------------------------------------
    def check_base(self, model: EditableModel, *, reverting: bool = False) -> dict[str, Any]:
        """PatchError unless `model` is this patch's base (or, `reverting`, the base with
        this patch applied). Returns {"exact": whether the base weights match bit for bit,
        "relative": the largest relative sketch difference}. Writes nothing."""
        base = self.meta["base"]
        if config_digest(model) != base["config_sha256"]:
            raise PatchError(f"the model's config differs from the patch's base "
                             f"({base['model_id']}, {base['model_type']}): apply it to the "
                             f"model it was made on")
        worst = 0.0
        for name, info in base["params"].items():
            try:
                value = read_param(model.model, name)
            except LookupError:
                raise PatchError(f"the model has no parameter {name!r} that the patch changes: "
                                 f"apply it to its base ({base['model_id']})") from None
            if list(value.shape) != info["shape"]:
                raise PatchError(f"{name}: the model's shape {list(value.shape)} is not the "
                                 f"patch's {info['shape']}: apply it to {base['model_id']}")
            if str(value.dtype).replace("torch.", "") != info["dtype"]:
                raise PatchError(f"{name}: the model holds {value.dtype}, the patch was made on "
                                 f"{info['dtype']}: load the model with dtype={info['dtype']}")
            values = value.double()
            if reverting and name in self.meta["weights"]:
                values = values.cpu() - self.delta(name)
            s, ref = sketch(values), self._sketch[name]
            relative = float((s - ref).norm() / ref.norm().clamp_min(1e-300))
            worst = max(worst, relative)
            if relative > sketch_tolerance(value.dtype):
                if reverting:
                    hint = ("the model is not this patch's base with the patch applied: "
                            "revert patches in the reverse order they were applied")
                else:
                    hint = (f"the model is not this patch's base ({base['model_id']}); is the "
                            f"patch already applied, or was it made after other edits?")
                raise PatchError(f"{name} differs from the patch's base fingerprint "
                                 f"(relative {relative:.1e}): {hint}")
        exact = (not reverting and "weights_blake2b" in base
                 and _exact_base_digest(dict.fromkeys(base["params"]), model)
                 == base["weights_blake2b"])
        return {"exact": exact, "relative": worst}

    def apply(self, model: EditableModel) -> Editor | None:
        """Apply the patch to `model` in place, after checking it is the patch's base.

        Weight patches add their deltas (in float64, then cast to the weight's dtype).
        Editor-state patches build the method's editor on `model`, load the saved state and
        install its hooks; the editor is returned (MeLLo answers through `editor.answer`).
        """
        self.check_base(model)
        if self.needs_factedit:
            return self._install(model)
        updated = {}
        for name in self.meta["weights"]:
            current = read_param(model.model, name)
            new = (current.double() + self.delta(name).to(current.device)).to(current.dtype)
            if not torch.isfinite(new).all():
                raise PatchError(f"applying the patch puts NaN/inf into {name}; not applied")
            updated[name] = new
        for name, new in updated.items():
            write_param(model.model, name, new)
        return None

    def revert(self, model: EditableModel) -> None:
        """Take the patch out of `model` (checked: the result must be the patch's base)."""
        if self.needs_factedit:
            installed = _registry(model).pop(self.id, None)
            if installed is None:
                raise PatchError(f"patch {self.id} ({self.method}) is not applied to this "
                                 f"model: an editor-state patch can only be reverted in the "
                                 f"session that applied it (reload the base instead)")
            if installed.attachment is not None:
                installed.attachment.remove()
            return
        self.check_base(model, reverting=True)
        updated = {}
        for name in self.meta["weights"]:
            current = read_param(model.model, name)
            updated[name] = (current.double() - self.delta(name).to(current.device)).to(current.dtype)
        for name, new in updated.items():
            write_param(model.model, name, new)

    def _install(self, model: EditableModel) -> Editor:
        registry = _registry(model)
        if self.id in registry:
            raise PatchError(f"patch {self.id} ({self.method}) is already applied to this model")
        try:
            editor = make_editor(model, self.method, self.meta["config"])
            editor.load_state_dict(dict(self._editor), self.meta["editor"])
        except (KeyError, TypeError, ValueError) as err:
            raise PatchError(f"cannot rebuild the {self.method} editor of this patch: {err}") from None
        attachment = editor.attachment()
        if attachment is not None:
            attachment.install()
        registry[self.id] = _Installed(editor, attachment)
        return editor

    def __repr__(self) -> str:
        return (f"Patch(method={self.method!r}, kind={self.meta['kind']!r}, "
                f"weights={len(self.meta['weights'])}, edits={self.meta['edits']})")


def _registry(model: EditableModel) -> dict[str, _Installed]:
    """Editor-state patches installed on `model`, by patch id (kept on the model object)."""
    registry = model.__dict__.get("_factedit_patches")
    if registry is None:
        registry = model.__dict__["_factedit_patches"] = {}
    return registry


def _exact_base_digest(base: dict[str, torch.Tensor | None], model: EditableModel) -> str:
    """blake2b of the base weights' bytes (a None value: read from `model` now)."""
    h = hashlib.blake2b()
    for name in sorted(base):
        value = base[name] if base[name] is not None else read_param(model.model, name)
        h.update(name.encode())
        h.update(_tensor_bytes(value))
    return h.hexdigest()


def _read_header(data: bytes, source: str) -> tuple[str, str]:
    """(description JSON, digest) from a safetensors header, or PatchError."""
    if len(data) < 8:
        raise PatchError(f"{source} is empty or truncated: not a patch file")
    size = int.from_bytes(data[:8], "little")
    if size <= 0 or 8 + size > len(data):
        raise PatchError(f"{source} is truncated or not a safetensors file (header of {size} "
                         f"bytes in a file of {len(data)})")
    try:
        header = json.loads(data[8:8 + size])
        metadata = header.get("__metadata__") or {}
        text, digest = metadata[META_KEY], metadata[DIGEST_KEY]
        json.loads(text)
    except (ValueError, KeyError, AttributeError, UnicodeDecodeError):
        raise PatchError(f"{source} is a safetensors file without a factedit patch "
                         f"description: write patches with Patch.save / factedit edit "
                         f"--patch") from None
    return text, digest


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=float))
