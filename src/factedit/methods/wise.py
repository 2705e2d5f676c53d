"""WISE (Wang et al., NeurIPS 2024, "WISE: Rethinking the Knowledge Memory for Lifelong
Model Editing"): a side copy of one FFN output projection, trained on the edits, and a router
that sends a token row to it only when the side memory's output departs from the main one.

The main memory is the model's own projection W (never changed). The side memory is
W' = W + D, D (d_out, d_in) trained by SGD on each edit in turn (sequential lifelong editing);
at every forward pass (an attachment) each row's activation score

    score(x) = mean over the row's positions t of || act(W' x_t) - act(W x_t) ||_2

(act: the model's MLP activation, as the reference applies it to both outputs) decides the
row's output: the side memory's if score >= act_ratio * min_i s_i, else the main memory's
untouched, where s_i is edit i's own score when its training ended. A prompt the edits did
not touch keeps the unedited model's output exactly.

An edit trains D for up to `steps` SGD steps (lr `lr`) on

    NLL(target_new | prompt)  with the side memory in place
    + mean[relu(out - in + gamma)] + mean[relu(out - alpha)] + mean[relu(beta - in)]

where `in` is the edit row's score and `out` the scores of unrelated rows (the request's
neighbourhood prompts, else `UNRELATED_PROMPTS`): the margin pushes edited rows above beta and
keeps unrelated ones below alpha. Only a random fraction `mask_ratio` of D's entries is trained
(a fixed seeded mask: the reference's random subspace), and every entry of D is clamped to
[-norm_constraint, norm_constraint] after each step.

Knowledge shards (the paper's section 3.2): every `shard_size` edits the side memory D is put
aside as a shard and a fresh D, with a fresh random mask, takes the next edits; every
`merge_every` edits the shards put aside are merged by TIES (`linalg.merge.ties_merge`, trim
to `merge_density`) into one merged memory M (with the M of earlier merges weighted
`merged_share`, the new shards sharing the rest, as the reference's 0.6 / 0.4). The router
then chooses, per row, among the main memory and every side memory there is (M, the shards
awaiting a merge, the current D): the one whose score is largest, if it reaches the threshold.

Departures from the reference (EasyEdit's easyeditor/models/wise/WISE.py):
- shards awaiting a merge answer through the router (as in the reference's retrieval
  variant); the reference instead merges them, with the current D, at the first forward pass
  after editing, which changes the memory on read. Only TIES merging (the reference's
  default `merge_alg`), not DARE, linear or slerp;
- routing is per row of the batch (the reference takes `.item()` of the batch's mean, so
  a batch shares one decision); the score is the mean over the row's positions that the
  attention mask keeps (padding left out, so a row routes the same in any batch), where the
  reference switches to the largest position above 100 tokens;
- factedit's own generation (`metrics.generation`) keeps the KV cache: each row's score
  sums run on one position at a time (`models.attach.followed_rows`), and a row that
  changes memory is run whole again once; `generate` re-runs whole rows at every step;
- the memory-replay losses of the retrieval variant are not implemented;
- SGD without the reference's 1e-5 weight decay (which pulls W', not D, towards zero).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.activations import ACT2FN

from ..linalg.merge import ties_merge
from ..models import EditableModel, Trace, frozen, start_at_layer
from ..models.attach import Attachment, AttachmentError, RowTracker
from ..requests import EditRequest
from ..text import pad_right, teacher_forced
from .base import ConfigError, Editor, EditResult, MethodConfig, StateSize, register_method
from .config import check_positive

# Out-of-scope rows for a request without neighbourhood prompts.
UNRELATED_PROMPTS = ("The weather today is", "My favourite breakfast is",
                     "The capital of Japan is")


@dataclass
class WiseConfig(MethodConfig):
    """WISE's fields (defaults: EasyEdit's Llama-2-7B hparams, except `layer` and the margins,
    see docs/methods/wise.md)."""

    layer: int | None = field(default=None, metadata={
        "help": "layer whose MLP output projection gets the side memory (None: 80% depth)"})
    steps: int = field(default=70, metadata={"help": "SGD steps per edit (the reference's n_iter)"})
    lr: float = field(default=1.0, metadata={"help": "SGD learning rate (edit_lr)"})
    mask_ratio: float = field(default=0.2, metadata={
        "help": "fraction of the side memory's entries that are trained (random, seeded)"})
    alpha: float = field(default=5.0, metadata={
        "help": "unrelated rows' activation score is pushed below this"})
    beta: float = field(default=20.0, metadata={
        "help": "edited rows' activation score is pushed above this"})
    gamma: float = field(default=10.0, metadata={
        "help": "margin between edited and unrelated rows' scores"})
    act_ratio: float = field(default=0.88, metadata={
        "help": "a row routes to the side memory when its score >= act_ratio * min edit score"})
    norm_constraint: float = field(default=1.0, metadata={
        "help": "every entry of the side memory's change is clamped to +- this"})
    early_stop_nll: float = field(default=0.05, metadata={
        "help": "an edit's training stops once its target NLL is below this and the edited row's "
                "score is above beta and gamma above the unrelated rows'"})
    seed: int = field(default=0, metadata={
        "help": "seed of the trained-entries mask (shard k uses seed + k)"})
    shard_size: int | None = field(default=500, metadata={
        "help": "edits per knowledge shard: after this many the side memory is put aside and a "
                "fresh one (fresh mask) takes the next edits (None: one shard; the reference's "
                "save_freq)"})
    merge_every: int | None = field(default=1000, metadata={
        "help": "every this many edits the shards put aside are TIES-merged into one memory "
                "(a multiple of shard_size; None: never merge; the reference's merge_freq)"})
    merge_density: float = field(default=0.53, metadata={
        "help": "fraction of each shard's largest entries kept by the TIES merge (densities)"})
    merged_share: float = field(default=0.6, metadata={
        "help": "weight of the memory merged before when new shards merge into it (the new "
                "shards share the rest)"})

    def __post_init__(self) -> None:
        if self.layer is not None and self.layer < 0:
            raise ConfigError(f"WiseConfig.layer={self.layer!r}: give a layer number >= 0 "
                              f"or None")
        check_positive(self, "steps", "lr", "act_ratio", "norm_constraint")
        if not 0 < self.mask_ratio <= 1:
            raise ConfigError(f"WiseConfig.mask_ratio={self.mask_ratio!r}: give a fraction "
                              f"in (0, 1]")
        for name in ("alpha", "beta", "gamma", "early_stop_nll"):
            if getattr(self, name) < 0:
                raise ConfigError(f"WiseConfig.{name}={getattr(self, name)!r}: must be >= 0")
        check_positive(self, "shard_size", "merge_every", optional=True)
        if self.merge_every is not None and (
                self.shard_size is None or self.merge_every % self.shard_size):
            raise ConfigError(f"WiseConfig.merge_every={self.merge_every!r}: give a multiple of "
                              f"shard_size={self.shard_size!r} (or merge_every=None)")
        if not 0 < self.merge_density <= 1:
            raise ConfigError(f"WiseConfig.merge_density={self.merge_density!r}: give a "
                              f"fraction in (0, 1]")
        if not 0 <= self.merged_share <= 1:
            raise ConfigError(f"WiseConfig.merged_share={self.merged_share!r}: give a "
                              f"fraction in [0, 1]")


class WiseEditor(Editor):
    """WISE: a trained side copy of one MLP output projection and a per-row activation router,
    applied through an attachment (module docstring)."""

    config_cls = WiseConfig
    config: WiseConfig
    supports_batch = False  # the reference edits one request at a time

    def __init__(self, model: EditableModel, config: WiseConfig) -> None:
        super().__init__(model, config)
        self.layer = model.check_layer(wise_layer(model, config), "WiseConfig.layer")
        self.module_name = model.arch.mlp_out_at(self.layer)
        self.delta = self.empty_memory()          # the current shard's side memory D
        self.mask = self.shard_mask(0)
        self.shards: list[torch.Tensor] = []      # shards put aside, awaiting a merge
        self.merged: torch.Tensor | None = None   # the merged memory M, after the first merge
        self.edit_scores: list[float] = []  # each edit's own score when its training ended
        self._bypass = False  # set while `routes_to_side` reads the main memory's output
        # per followed row: each memory's score sum, the positions, the memory chosen (-1: main)
        self._rows = RowTracker()
        self._mask: torch.Tensor | None = None  # the attention mask of the forward under way
        act = getattr(model.model.config, "hidden_act", None) or getattr(
            model.model.config, "activation_function", "gelu_new")
        self.act = ACT2FN[act]

    @property
    def edit_count(self) -> int:
        """Edits made so far (each leaves its score)."""
        return len(self.edit_scores)

    def empty_memory(self) -> torch.Tensor:
        d_out, d_in = self.model.weight_shape(self.layer)
        return torch.zeros(d_out, d_in, dtype=self.model.dtype, device=self.model.device)

    def shard_mask(self, shard: int) -> torch.Tensor:
        """The trained entries of shard `shard` (seeded: seed + shard)."""
        d_out, d_in = self.model.weight_shape(self.layer)
        gen = torch.Generator().manual_seed(self.config.seed + shard)
        return (torch.rand(d_out, d_in, generator=gen) < self.config.mask_ratio).to(
            self.model.device)

    def side_memories(self) -> list[torch.Tensor]:
        """Every side memory the router may choose: M, the shards awaiting a merge, and the
        current D once it holds an edit."""
        memories = ([] if self.merged is None else [self.merged]) + list(self.shards)
        shard_size = self.config.shard_size
        edits_in_current = self.edit_count % shard_size if shard_size else self.edit_count
        if edits_in_current:
            memories.append(self.delta)
        return memories

    # -- the router -----------------------------------------------------------------------------
    def side_output(self, x: torch.Tensor, output: torch.Tensor,
                    delta: torch.Tensor | None = None) -> torch.Tensor:
        """W' x = W x + D x (the bias, if any, is in `output` already)."""
        delta = self.delta if delta is None else delta
        return output + x @ delta.to(x.dtype).T

    def side_outputs(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """(K, B, T, d_out): the output of every side memory the router may choose."""
        return torch.stack([self.side_output(x, output, d) for d in self.side_memories()])

    def position_scores(self, main: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        """(..., T) ||act(side) - act(main)|| at each position."""
        return (self.act(side) - self.act(main)).norm(dim=-1)

    def scores(self, main: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        """(B,) mean over positions of ||act(side) - act(main)|| (float64)."""
        return self.position_scores(main, side).double().mean(dim=-1)

    def threshold(self) -> float:
        return self.config.act_ratio * min(self.edit_scores)

    def _keep_mask(self, _module: Any, args: tuple, kwargs: dict) -> None:
        """Pre-hook on the base model: the forward's attention mask, so that padding does not
        count in a row's score (a row's route does not depend on the batch it is in)."""
        mask = kwargs.get("attention_mask")
        self._mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _position_weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T) float64: 1 at the positions of x that count in a row's score, 0 at padding."""
        mask = self._mask
        if mask is None or mask.shape[0] != x.shape[0] or mask.shape[1] < x.shape[1]:
            return torch.ones(x.shape[:2], dtype=torch.float64, device=x.device)
        return mask[:, -x.shape[1]:].to(device=x.device, dtype=torch.float64)

    def _route(self, _module: Any, args: tuple, kwargs: dict, output: torch.Tensor) -> Any:
        if not self.edit_scores or self._bypass:
            return None
        x = args[0] if args else kwargs["input"]
        rows = self._rows
        if rows.active and rows.state is not None:  # one new position per followed row
            return self._route_next(x, output)
        sides = self.side_outputs(x, output)
        weights = self._position_weights(x)                                 # (B, T)
        sums = (self.position_scores(output[None], sides).double() * weights).sum(-1)  # (K, B)
        count = weights.sum(-1)
        best_score, best = (sums / count.clamp_min(1)).max(0)              # (B,)
        chosen = torch.where(best_score >= self.threshold(), best, -1)
        if rows.active:  # the prompt rows of a followed generation: the running sums
            rows.state = torch.cat([sums.T, count[:, None], chosen[:, None].double()], dim=1)
        return self._answer(sides, output, chosen)

    def _route_next(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
        """The router on a cached step (`followed_rows`): a row's score is the mean over all
        its positions, so the new position's score joins the row's running sum. A row whose
        choice of memory changes has stale earlier positions (they answered from the memory
        chosen before): the tracker asks for the whole rows again."""
        rows = self._rows
        if x.shape[1] != 1 or rows.state.shape[0] != x.shape[0]:
            raise AttachmentError(
                f"wise: a followed generation must step one position per row and say which "
                f"rows leave (got {tuple(x.shape[:2])} for {rows.state.shape[0]} rows)")
        sides = self.side_outputs(x, output)
        n_sides = sides.shape[0]
        weight = self._position_weights(x)[:, 0]
        new = self.position_scores(output[None], sides)[..., 0].T.double()   # (B, K)
        sums = rows.state[:, :n_sides] + new * weight[:, None]
        count = rows.state[:, n_sides] + weight
        best_score, best = (sums / count.clamp_min(1)[:, None]).max(1)
        chosen = torch.where(best_score >= self.threshold(), best, -1)
        if bool((chosen != rows.state[:, n_sides + 1].long()).any()):
            rows.rerun = True
        rows.state = torch.cat([sums, count[:, None], chosen[:, None].double()], dim=1)
        return self._answer(sides, output, chosen)

    @staticmethod
    def _answer(sides: torch.Tensor, output: torch.Tensor, chosen: torch.Tensor
                ) -> torch.Tensor | None:
        """Each row's output from the memory `chosen` for it (-1: the main memory); None
        where every row stays on the main memory (its output untouched)."""
        to_side = chosen >= 0
        if not bool(to_side.any()):
            return None
        side = sides[chosen.clamp_min(0), torch.arange(sides.shape[1], device=sides.device)]
        return torch.where(to_side[:, None, None], side, output)

    @contextmanager
    def router_off(self) -> Iterator[None]:
        """The projection gives the main memory's output inside the block (hooks stay)."""
        self._bypass = True
        try:
            yield
        finally:
            self._bypass = False

    def attachment(self) -> Attachment:
        # Whole rows for `generate`; factedit's own generation follows the rows instead.
        return (Attachment(self.model.model, needs_full_sequence=True, rows=self._rows)
                .add_pre_hook(self.model.model.base_model, self._keep_mask)
                .add_forward_hook(self.model.module(self.module_name), self._route))

    def routes_to_side(self, text: str) -> bool:
        """Whether the router sends `text` (one row) to the side memory."""
        ids = torch.tensor([self.model.tokenizer(text)["input_ids"]], device=self.model.device)
        with self.router_off(), torch.no_grad(), Trace(
                self.model.model, self.module_name, retain_input=True, retain_output=True,
                stop=True) as proj:
            self.model.model.base_model(input_ids=ids, use_cache=False)
        if not self.edit_scores:
            return False
        sides = self.side_outputs(proj.input, proj.output)
        return bool(self.scores(proj.output[None], sides).max() >= self.threshold())

    # -- one edit -------------------------------------------------------------------------------
    def compute(self, requests: Sequence[EditRequest]) -> EditResult:
        """Train the side memory on the one request; no deltas (the edit acts through the
        attachment)."""
        if len(requests) != 1:
            raise ValueError("wise edits one request at a time: use mode='sequential'")
        request, = requests
        c, model, tok = self.config, self.model, self.model.tokenizer
        result = EditResult()
        ids, first, answer = teacher_forced(tok, request.rewrite_prompt, request.target_new)
        unrelated = [p for p, _ in request.neighborhood] or list(UNRELATED_PROMPTS)
        rows = [ids] + [tok(p)["input_ids"] for p in unrelated]
        padded, mask = pad_right(rows, tok.pad_token_id)
        ids_t = torch.tensor(padded, device=model.device)
        mask_t = torch.tensor(mask, device=model.device)
        lengths = mask_t.sum(1)
        positions = torch.arange(first, first + len(answer), device=model.device)
        targets = torch.tensor(answer, device=model.device)
        with torch.no_grad(), Trace(model.model, model.arch.layer(self.layer),
                                    retain_input=True, stop=True) as block:
            model.model.base_model(input_ids=ids_t, attention_mask=mask_t, use_cache=False)
        hidden_in = block.input.clone()
        delta = torch.nn.Parameter(self.delta.clone())
        optimiser = torch.optim.SGD([delta], lr=c.lr)
        scores: dict[str, torch.Tensor] = {}

        def put_side(output: torch.Tensor, _name: str) -> torch.Tensor:
            side = self.side_output(layer_input["x"], output, delta)
            valid = mask_t[..., None].to(side.dtype)
            gap = (self.act(side) - self.act(output)).norm(dim=-1)          # (B, T)
            scores["rows"] = (gap * valid[..., 0]).sum(1) / lengths
            return side

        layer_input: dict[str, torch.Tensor] = {}

        def keep_input(x: torch.Tensor, _name: str) -> torch.Tensor:
            layer_input["x"] = x
            return x

        nll, margin, step = float("inf"), float("inf"), 0
        # The router stands aside while D trains: the projection's output reaching `put_side`
        # must be the main memory's, not the side memory of the edits before.
        with self.router_off(), result.timed("train"), torch.enable_grad(), \
                frozen(model.model):
            for step in range(c.steps + 1):
                with start_at_layer(model.layers, self.layer, hidden_in,
                                    model.block_returns_tuple), \
                        Trace(model.model, self.module_name, edit_input=keep_input,
                              edit_output=put_side):
                    hidden = model.model.base_model(input_ids=ids_t, attention_mask=mask_t,
                                                    use_cache=False).last_hidden_state
                logp = torch.log_softmax(model.head_logits(hidden[0, positions]).double(), -1)
                nll_t = -logp.gather(1, targets[:, None]).mean()
                edit_score, out = scores["rows"][0], scores["rows"][1:]
                separation = (torch.relu(out - edit_score + c.gamma).mean()
                              + torch.relu(c.beta - edit_score))
                margin_t = separation + torch.relu(out - c.alpha).mean()
                loss = nll_t + margin_t.double()
                nll, margin = float(nll_t.detach()), float(margin_t.detach())
                # Done once the target is learnt and the edited row stands gamma above the
                # unrelated ones and above beta (the alpha term alone may never reach zero:
                # a trained D moves every row a little).
                if (nll < c.early_stop_nll and float(separation.detach()) == 0.0) or step == c.steps:
                    break
                delta.grad, = torch.autograd.grad(loss, [delta])
                delta.grad *= self.mask
                optimiser.step()
                with torch.no_grad():
                    delta.clamp_(-c.norm_constraint, c.norm_constraint)
        self.delta = delta.detach().clone()
        self.edit_scores.append(float(scores["rows"][0].detach()))
        result.info.update(target_nll=nll, margin_loss=margin, steps=step,
                           edit_score=self.edit_scores[-1],
                           unrelated_score=float(scores["rows"][1:].max().detach()),
                           threshold=self.threshold())
        if c.shard_size and self.edit_count % c.shard_size == 0:
            self.shards.append(self.delta)
            self.delta = self.empty_memory()
            self.mask = self.shard_mask(self.edit_count // c.shard_size)
            result.info.update(shard_closed=True)
            if c.merge_every and self.edit_count % c.merge_every == 0:
                self.merge_shards()
                result.info.update(merged=True)
        return result

    def merge_shards(self) -> None:
        """TIES-merge the shards put aside (and the memory merged before, weighted
        `merged_share`) into M; computed in float64."""
        c = self.config
        deltas = [s.double() for s in self.shards]
        weights = [1.0 / len(deltas)] * len(deltas)
        if self.merged is not None:
            weights = [(1.0 - c.merged_share) / len(deltas)] * len(deltas) + [c.merged_share]
            deltas.append(self.merged.double())
        self.merged = ties_merge(deltas, weights, c.merge_density).to(self.model.dtype)
        self.shards = []

    # -- save / resume ------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        manifest = {"wise": True, "layer": self.layer, "edit_scores": list(self.edit_scores),
                    "shards": len(self.shards),
                    "merged": self.merged is not None, "config": self.config.to_dict()}
        tensors = {"delta": self.delta.cpu(), "mask": self.mask.cpu()}
        tensors.update({f"shard_{i}": s.cpu() for i, s in enumerate(self.shards)})
        if self.merged is not None:
            tensors["merged"] = self.merged.cpu()
        return tensors, manifest

    def load_state_dict(self, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
        if not manifest.get("wise") or manifest.get("layer") != self.layer:
            raise ValueError(f"WiseEditor: the saved state is not a WISE side memory at layer "
                             f"{self.layer} (saved layer: {manifest.get('layer')!r}); build the "
                             f"editor with the saved config")
        self.delta = tensors["delta"].to(dtype=self.model.dtype, device=self.model.device).clone()
        self.mask = tensors["mask"].to(self.model.device).bool().clone()
        self.edit_scores = [float(s) for s in manifest["edit_scores"]]

        def memory(name: str) -> torch.Tensor:
            return tensors[name].to(dtype=self.model.dtype, device=self.model.device).clone()

        self.shards = [memory(f"shard_{i}") for i in range(int(manifest.get("shards", 0)))]
        self.merged = memory("merged") if manifest.get("merged") else None


def wise_layer(model: EditableModel, config: WiseConfig) -> int:
    """The layer whose projection gets the side memory: config.layer, else 80% of the depth."""
    return round(0.8 * (model.num_layers - 1)) if config.layer is None else config.layer


def wise_state_size(model: EditableModel, config: MethodConfig) -> StateSize:
    """The side memories at their most (the merged one, the shards awaiting a merge and the
    current one) and the current shard's trained-entries mask."""
    assert isinstance(config, WiseConfig)
    layer = wise_layer(model, config)
    d_out, d_in = model.weight_shape(layer)
    itemsize = torch.empty(0, dtype=model.dtype).element_size()
    if config.shard_size is None:
        memories, growth = 1, "independent of the number of edits"
    elif config.merge_every is None:
        memories, growth = 1, f"one more side memory every {config.shard_size} edits"
    else:
        memories, growth = config.merge_every // config.shard_size + 1, \
            "independent of the number of edits (shards merge)"
    return StateSize(per_layer=d_out * d_in * (memories * itemsize + 1), layers=1,
                     parts=f"up to {memories} side memories (merged, shards, current) and "
                           f"the current shard's trained-entries mask", growth=growth)


register_method("wise", WiseConfig, WiseEditor,
                "side memory of one MLP projection with an activation router (WISE)",
                state_size=wise_state_size)
