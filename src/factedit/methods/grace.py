"""GRACE (Hartvigsen et al., "Aging with GRACE: Lifelong Model Editing with Discrete
Key-Value Adaptors", NeurIPS 2023): a codebook wrapped around one layer, weights untouched.

The wrapped module is the MLP output projection of `layer`. The codebook holds entries
(key k_i, value v_i, deferral radius eps_i, label y_i): k_i is the projection's input at the
last prompt token of an edit, v_i a trained replacement for its output, y_i the edit's
target_new. At every forward pass (an attachment, `models.attach`) the input at each
position t is compared with the keys (Euclidean); position t matches entry i when
||x_t - k_i|| <= eps_i for the nearest key. Replacement (`replacement`):

    "from_key"  the output at the row's first matching position and at every position
                after it becomes that entry's value (the paper's code replaces all tokens
                once the key matches; layers above read the value from the key token on)
    "key"       only matching positions are replaced (works with a KV cache)

Codebook update for a new edit with key k and label y (the paper's rules):
    nearest entry i at distance d;
    d > eps_init + eps_i          -> new entry (k, v, eps_init)
    y != y_i  (conflict)          -> split: new entry (k, v, d / 2), eps_i = d / 2
    y == y_i                      -> expand: eps_i = max(eps_i, d) ("coverage")
The value v of each edit is trained with Adam, starting from the layer's own output at the
key token (the paper's "warm" init), to minimise the teacher-forced NLL of target_new with
the replacement active, until the NLL is below `early_stop_nll` or `steps` are done.

Departures: the paper also keeps training the nearest entry's value when an edit expands it;
here each edit trains and stores its own value (used when the edit owns an entry), and the
codebook is a function of the live edits replayed in order, so `remove(edit_id)` gives the
codebook the other edits would have built without it. Values are not trained with the
paper's adversarial perturbations (`num_pert`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..models import EditableModel, Trace, start_at_layer
from ..models.attach import Attachment, AttachmentError, RowTracker
from ..requests import EditRequest
from ..text import continuation_ids, encode
from .base import ConfigError, Editor, EditResult, MethodConfig, register_method
from .config import PAPER, check_choice, check_positive, sourced

REPLACEMENTS = ("from_key", "key")


@dataclass
class GraceConfig(MethodConfig):
    """GRACE's fields (defaults: EasyEdit's GRACE hparams).

    layer: layer whose MLP output projection carries the codebook (None: 80% of the depth;
        EasyEdit uses 27 of Llama-2-7B's 32).
    eps: initial deferral radius, in the units of the projection's input.
    steps, lr: Adam steps and learning rate of each edit's value.
    replacement: "from_key" | "key" (module docstring).
    early_stop_nll: a value's training stops once the target NLL is below this.
    """

    layer: int | None = sourced(None, "depth rule: 80% of the depth (EasyEdit: layer 27 of "
                                "Llama-2-7B's 32)")
    eps: float = sourced(1.0, PAPER)
    steps: int = sourced(100, PAPER)
    lr: float = sourced(1.0, PAPER)
    replacement: str = sourced("from_key", PAPER)
    early_stop_nll: float = sourced(0.01, PAPER)

    def __post_init__(self) -> None:
        if self.layer is not None and (not isinstance(self.layer, int) or self.layer < 0):
            raise ConfigError(f"GraceConfig.layer={self.layer!r}: give a layer number >= 0 "
                              f"or None")
        check_positive(self, "eps", "steps", "lr")
        check_choice(self, "replacement", REPLACEMENTS)
        if self.early_stop_nll < 0:
            raise ConfigError("GraceConfig.early_stop_nll must be >= 0")


@dataclass
class Codebook:
    """Entries derived from the live edits: keys (N, d_in), values (N, d_out), radii (N,)."""

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    radii: list[float] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    owners: list[int] = field(default_factory=list)  # edit id that created each entry

    def insert(self, edit_id: int, key: torch.Tensor, value: torch.Tensor, label: str,
               eps: float) -> str:
        """Apply the paper's add / split / expand rule; returns which one happened."""
        if not self.keys:
            action = "add"
        else:
            dists = torch.stack(self.keys).sub(key).norm(dim=-1)
            d, i = float(dists.min()), int(dists.argmin())
            if d > eps + self.radii[i]:
                action = "add"
            elif label != self.labels[i]:
                self.radii[i] = eps = d / 2
                action = "split"
            else:
                self.radii[i] = max(self.radii[i], d)
                return "expand"
        self.keys.append(key)
        self.values.append(value)
        self.radii.append(eps)
        self.labels.append(label)
        self.owners.append(edit_id)
        return action


class GraceEditor(Editor):
    """GRACE: a codebook on one layer's MLP output projection, applied through an attachment;
    each edit trains a value and inserts, splits or widens an entry (module docstring)."""

    config: GraceConfig
    supports_batch = False  # one key per edit, as in the paper

    def __init__(self, model: EditableModel, config: GraceConfig) -> None:
        super().__init__(model, config)
        layer = round(0.8 * (model.num_layers - 1)) if config.layer is None else config.layer
        self.layer = model.check_layer(layer, "GraceConfig.layer")
        self.module_name = model.arch.mlp_out_at(self.layer)
        # Live edits in order: (edit_id, key, value, label); the codebook is replayed from them.
        self.edits: list[tuple[int, torch.Tensor, torch.Tensor, str]] = []
        self.codebook = Codebook()
        self.next_edit_id = 0
        self._tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._rows = RowTracker()  # the entry each followed row matched (-1: none yet)

    # -- editing ------------------------------------------------------------------------------
    def compute(self, requests: Sequence[EditRequest]) -> EditResult:
        """Train the one request's value, update the codebook, and return no deltas (the edit
        acts through the attachment)."""
        if len(requests) != 1:
            raise ValueError("grace edits one request at a time: use mode='sequential'")
        request, = requests
        result = EditResult()
        with result.timed("train"):
            key, value, nll, steps = self._train_value(request)
        edit_id, self.next_edit_id = self.next_edit_id, self.next_edit_id + 1
        self.edits.append((edit_id, key, value, request.target_new))
        action = self.codebook.insert(edit_id, key, value, request.target_new, self.config.eps)
        self._tensors = None
        result.info.update(target_nll=nll, steps=steps, codebook_action=action,
                           codebook_size=len(self.codebook.keys))
        return result

    def remove(self, edit_id: int) -> EditResult:
        """Rebuild the codebook from the other live edits (no deltas: weights untouched)."""
        self.edits = [e for e in self.edits if e[0] != edit_id]
        self._replay()
        return EditResult(info={"codebook_size": len(self.codebook.keys)})

    def _replay(self) -> None:
        self.codebook = Codebook()
        for edit_id, key, value, label in self.edits:
            self.codebook.insert(edit_id, key, value, label, self.config.eps)
        self._tensors = None

    def _train_value(self, request: EditRequest
                     ) -> tuple[torch.Tensor, torch.Tensor, float, int]:
        """(key, trained value, final target NLL, Adam steps taken) of one edit."""
        c, model = self.config, self.model
        tok, device = model.tokenizer, model.device
        prompt_ids = encode(tok, request.rewrite_prompt)
        target = continuation_ids(tok, request.rewrite_prompt, request.target_new)
        ids = torch.tensor([prompt_ids + target[:-1]], device=device)
        key_pos = len(prompt_ids) - 1
        positions = torch.arange(key_pos, key_pos + len(target), device=device)
        targets = torch.tensor(target, device=device)
        with torch.no_grad(), Trace(model.model, model.arch.layer(self.layer),
                                    retain_input=True) as block, \
                Trace(model.model, self.module_name, retain_input=True, retain_output=True,
                      stop=True) as proj:
            model.model.base_model(input_ids=ids, use_cache=False)
        key = proj.input[0, key_pos].clone()
        value = torch.nn.Parameter(proj.output[0, key_pos].clone())  # warm start
        hidden_in = block.input.clone()
        replace = torch.zeros(ids.shape[1], dtype=torch.bool, device=device)
        if c.replacement == "from_key":
            replace[key_pos:] = True
        else:
            replace[key_pos] = True

        def put_value(output: torch.Tensor, _name: str) -> torch.Tensor:
            return torch.where(replace[None, :, None], value.to(output.dtype), output)

        optimiser = torch.optim.Adam([value], lr=c.lr)
        nll, step = float("inf"), 0
        for step in range(c.steps + 1):
            with start_at_layer(model.layers, self.layer, hidden_in, model.block_returns_tuple), \
                    Trace(model.model, self.module_name, edit_output=put_value):
                hidden = model.model.base_model(input_ids=ids, use_cache=False).last_hidden_state
            logp = torch.log_softmax(model.head_logits(hidden[0, positions]).double(), dim=-1)
            loss = -logp.gather(1, targets[:, None]).mean()
            nll = float(loss.detach())
            if nll < c.early_stop_nll or step == c.steps:
                break
            value.grad, = torch.autograd.grad(loss, [value])
            optimiser.step()
        return key.cpu(), value.detach().clone().cpu(), nll, step

    # -- the attachment -----------------------------------------------------------------------
    def attachment(self) -> Attachment:
        module = self.model.module(self.module_name)
        from_key = self.config.replacement == "from_key"
        # From the key on, a row needs its earlier positions only through the entry that
        # matched there: kept per row, so factedit's own generation keeps its KV cache.
        return Attachment(self.model.model, needs_full_sequence=from_key,
                          rows=self._rows if from_key else None
                          ).add_forward_hook(module, self._replace)

    def _codebook_tensors(self, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self._tensors is None or self._tensors[0].device != like.device:
            book = self.codebook
            # Built outside inference mode: a codebook cached while evaluating must still
            # serve a later forward that autograd records (training, attribution).
            with torch.inference_mode(False):
                self._tensors = (torch.stack(book.keys).to(like.device),
                                 torch.stack(book.values).to(like.device),
                                 torch.tensor(book.radii, device=like.device,
                                              dtype=torch.float64))
        return self._tensors

    def _replace(self, _module: Any, args: tuple, kwargs: dict, output: torch.Tensor) -> Any:
        if not self.codebook.keys:
            return None
        x = args[0] if args else kwargs["input"]                          # (B, T, d_in)
        keys, values, radii = self._codebook_tensors(x)
        dists = torch.cdist(x.to(keys.dtype), keys[None].expand(x.shape[0], -1, -1))  # (B, T, N)
        nearest_dist, nearest = dists.min(dim=-1)                         # (B, T)
        match = nearest_dist.double() <= radii[nearest]
        rows = self._rows
        if rows.active and rows.state is not None:  # one new position per followed row
            return self._replace_next(x, match, nearest, values, output)
        if self.config.replacement == "from_key":
            first = torch.where(match.any(1), match.double().argmax(1), match.shape[1])  # (B,)
            chosen = nearest.gather(1, first.clamp_max(match.shape[1] - 1)[:, None])   # (B, 1)
            if rows.active:  # the prompt rows of a followed generation: remember the entry
                rows.state = torch.where(first < match.shape[1], chosen[:, 0], -1)
            steps = torch.arange(match.shape[1], device=x.device)
            match = steps[None, :] >= first[:, None]
            nearest = chosen.expand_as(nearest)
        if not bool(match.any()):
            return None
        replaced = values[nearest].to(output.dtype)                       # (B, T, d_out)
        return torch.where(match[..., None], replaced, output)

    def _replace_next(self, x: torch.Tensor, match: torch.Tensor, nearest: torch.Tensor,
                      values: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
        """from_key on a cached step: a row that matched before keeps its entry's value; one
        that had not matches at this position or not (`followed_rows`)."""
        rows = self._rows
        if x.shape[1] != 1 or rows.state.shape[0] != x.shape[0]:
            raise AttachmentError(
                f"grace: a followed generation must step one position per row and say which "
                f"rows leave (got {tuple(x.shape[:2])} for {rows.state.shape[0]} rows)")
        rows.state = torch.where((rows.state < 0) & match[:, 0], nearest[:, 0], rows.state)
        hit = rows.state >= 0
        if not bool(hit.any()):
            return None
        replaced = values[rows.state.clamp_min(0)][:, None].to(output.dtype)  # (B, 1, d_out)
        return torch.where(hit[:, None, None], replaced, output)

    # -- save / resume ------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        d_in, d_out = self._shapes()
        keys = torch.stack([e[1] for e in self.edits]) if self.edits else torch.zeros(0, d_in)
        values = torch.stack([e[2] for e in self.edits]) if self.edits else torch.zeros(0, d_out)
        manifest = {"grace": True, "layer": self.layer, "next_edit_id": self.next_edit_id,
                    "edit_ids": [e[0] for e in self.edits], "labels": [e[3] for e in self.edits]}
        return {"keys": keys, "values": values}, manifest

    def load_state_dict(self, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
        if not manifest.get("grace") or manifest.get("layer") != self.layer:
            raise ValueError(f"GraceEditor: the saved state is not a GRACE codebook at layer "
                             f"{self.layer} (manifest layer: {manifest.get('layer')!r})")
        self.edits = list(zip(manifest["edit_ids"], tensors["keys"], tensors["values"],
                              manifest["labels"]))
        self.next_edit_id = manifest["next_edit_id"]
        self._replay()

    def _shapes(self) -> tuple[int, int]:
        """(d_in, d_out) of the wrapped projection (Conv1D stores its weight as (in, out))."""
        shape = tuple(self.model.mlp_out(self.layer).weight.shape)
        return shape if self.model.arch.conv1d else (shape[1], shape[0])


register_method("grace", GraceConfig, GraceEditor,
                "codebook of keys and trained values at one MLP layer, weights untouched (GRACE)")
