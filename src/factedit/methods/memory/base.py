"""Memory editors (IKE, MemPrompt): keep the edits as text, retrieve them, prepend context.

A memory editor stores each edit request with a retrieval key and changes no weight. At
query time an attachment (two hooks on the base model, `models.attach`) acts on every
forward pass:

1. retrieval: for each row of `input_ids`, the stored edits most similar to the row;
2. context: the method's context tokens of each row that retrieved an edit run first, each
   distinct context once per batch, and their KV cache becomes the rows' past;
3. the rows run on that past, so every caller (scoring positions computed from prompt
   lengths, `generate`, a harness) sees hidden states of exactly the length and order it
   asked for.

Retrieval key. The mean over tokens of the residual stream after block `retrieval_layer`
(the model's own representation; no other model, no download), compared by cosine
similarity. A stored edit's key is that mean over its rewrite prompt. A row is compared
through its *prefix* means, h_bar_t = mean(h_1..h_t) for every real token t, and an edit's
score is the best over t. Hidden states are causal, so a prefix mean does not depend on
the tokens after it: a row scores the same whichever answer follows the prompt (scoring
" Rome" and " Paris" retrieves the same context) and keeps its retrieval while `generate`
appends tokens. A row with no score >= `threshold` is left untouched; a batch in which no
row retrieves anything runs bit-identically to the unedited model.

Context as past. The distinct contexts of a batch are left-padded to one length C_max,
[pad..., context], with the attention mask 0 on the pads and position ids from 0, and run
once (`share_contexts`; rows of one record usually retrieve the same edit, and the context
tokens are most of the cost: IKE's scoring of 40 zsRE records 419 s -> 177 s). Each row then
runs with its context's cache rows as past (a row without context: any row, masked out),
its positions shifted by its context's length, so a matched row computes exactly what the
model computes on context + row alone. The returned cache (context + row) is dropped: a KV
cache cannot be continued across a context that is prepended afresh at every forward, so
the attachment turns the cache off for `generate` (every step re-runs the full row: exact,
quadratic in the generated length) and refuses a forward that continues a non-empty cache.

Followed rows. factedit's own generation (`metrics.generation`) announces its rows
(`models.attach.followed_rows`): there the context + row cache is kept, each cached step
runs one new position with its row's context mask and position shift, and retrieval takes
the new prefix in (the prefix means' running sums with a context-free cache of the layers
up to `retrieval_layer`; SERAC: the decoded row so far). A row whose context would change
at the new position has stale positions: the whole rows run again once, so the text equals
re-running whole rows.

Subclasses implement `context(best, ranked)`: the text prepended for a row whose best
edit is `best` (`ranked`: every edit above the threshold, most similar first).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from ...models import EditableModel, Trace
from ...models.attach import Attachment, AttachmentError, RowTracker
from ...requests import EditRequest
from ...text import encode, pad_right
from ..base import ConfigError, Editor, EditResult, MethodConfig


@dataclass
class MemoryConfig(MethodConfig):
    """Fields shared by the memory editors.

    retrieval_layer: block whose output is mean-pooled for retrieval (None: a third of the
        depth; deeper matches paraphrases better and costs more per forward).
    threshold: cosine similarity a row needs to retrieve a stored edit (-1: always the best).
    share_contexts: rows of a batch that retrieve the same context share one forward of it
        (False: each row runs its own; same scores, for measuring what sharing saves).
    """

    retrieval_layer: int | None = None
    threshold: float = 0.9
    share_contexts: bool = True

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.retrieval_layer is not None and (
                not isinstance(self.retrieval_layer, int) or self.retrieval_layer < 0):
            raise ConfigError(f"{name}.retrieval_layer={self.retrieval_layer!r}: give a layer "
                              f"number >= 0, or None for a third of the depth")
        if isinstance(self.threshold, bool) or not (isinstance(self.threshold, (int, float))
                                                    and -1.0 <= self.threshold <= 1.0):
            raise ConfigError(f"{name}.threshold={self.threshold!r}: a cosine similarity in "
                              f"[-1, 1]")
        if not isinstance(self.share_contexts, bool):
            raise ConfigError(f"{name}.share_contexts={self.share_contexts!r}: give true or "
                              f"false")


def check_context_template(config: MethodConfig, field_name: str = "template") -> None:
    """ConfigError unless the config's context template formats with {prompt} and {target}."""
    template = getattr(config, field_name)
    try:
        template.format(prompt="p", target="t")
    except (KeyError, IndexError, ValueError, AttributeError) as err:
        raise ConfigError(f"{type(config).__name__}.{field_name}={template!r}: only {{prompt}} "
                          f"and {{target}} may appear in braces ({err!r})") from None


@dataclass
class MemoryEntry:
    """One stored request: the edit it belongs to, the request, its retrieval key (d,)."""

    edit_id: int
    request: EditRequest
    key: torch.Tensor


class MemoryEditor(Editor):
    """Stores requests, retrieves them per row, prepends `context(...)` (module docstring)."""

    config: MemoryConfig

    def __init__(self, model: EditableModel, config: MemoryConfig) -> None:
        super().__init__(model, config)
        layer = config.retrieval_layer
        self.retrieval_layer = model.check_layer(
            max(0, model.num_layers // 3 - 1) if layer is None else layer,
            f"{type(config).__name__}.retrieval_layer")
        self.entries: list[MemoryEntry] = []
        self.next_edit_id = 0
        self.threshold = config.threshold
        # Per followed row: its context (mask, position shift, tokens) and retrieval state.
        self._rows = RowTracker()
        self._inner_forward = False     # retrieval and context forwards are not rewritten
        self._context_applied = False   # set by the pre-hook, read by the forward hook
        self._cache_field = model.cache_field

    # -- the method's part --------------------------------------------------------------------
    def context(self, best: EditRequest, ranked: Sequence[EditRequest]) -> str:
        raise NotImplementedError

    # -- editing ------------------------------------------------------------------------------
    def compute(self, requests: Sequence[EditRequest]) -> EditResult:
        """Store `requests` as one edit (its id is the number of edits so far)."""
        result = EditResult()
        with result.timed("keys"):
            keys = self.keys_of([r.rewrite_prompt for r in requests])
        edit_id, self.next_edit_id = self.next_edit_id, self.next_edit_id + 1
        self.entries += [MemoryEntry(edit_id, r, k) for r, k in zip(requests, keys)]
        result.info.update(edit_id=edit_id, memory_size=len(self.entries))
        return result

    def remove(self, edit_id: int) -> EditResult:
        """Forget the requests of edit `edit_id` (no deltas: the weights never changed)."""
        self.entries = [e for e in self.entries if e.edit_id != edit_id]
        return EditResult(info={"memory_size": len(self.entries)})

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        keys = (torch.stack([e.key for e in self.entries]) if self.entries
                else torch.zeros(0, self.model.model.config.hidden_size, dtype=torch.float64))
        manifest = {"memory": True, "next_edit_id": self.next_edit_id,
                    "edit_ids": [e.edit_id for e in self.entries],
                    "requests": [e.request.to_dict() for e in self.entries]}
        return {"keys": keys}, manifest

    def load_state_dict(self, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
        if not manifest.get("memory") or "keys" not in tensors:
            raise ValueError(f"{type(self).__name__}: the saved state is not a memory "
                             f"editor's (method {self.config.method!r})")
        keys = tensors["keys"].to(torch.float64)
        self.entries = [MemoryEntry(i, EditRequest.from_dict(r), k) for i, r, k in
                        zip(manifest["edit_ids"], manifest["requests"], keys)]
        self.next_edit_id = manifest["next_edit_id"]

    def fresh(self) -> Editor:
        return type(self)(self.model, self.config)

    # -- retrieval ----------------------------------------------------------------------------
    def retrieval_outputs(self, ids: torch.Tensor, mask: torch.Tensor,
                          cache: DynamicCache | None = None,
                          positions: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, d) float64: block `retrieval_layer`'s output at each position of `ids`
        (with `cache`: the positions after the cached ones, which the cache gains), masked
        by the last T columns of `mask` (the whole rows' attention mask). Summed and divided
        by the running count, this is the mean over the real tokens <= t."""
        model = self.model
        if positions is None:
            positions = (mask.long().cumsum(-1) - 1).clamp_min(0)[:, -ids.shape[1]:]
        self._inner_forward = True
        try:
            with torch.no_grad(), Trace(model.model, model.arch.layer(self.retrieval_layer),
                                        retain_output=True, stop=True) as block:
                model.model.base_model(input_ids=ids, attention_mask=mask,
                                       position_ids=positions, use_cache=cache is not None,
                                       **({self._cache_field: cache} if cache is not None
                                          else {}))
        finally:
            self._inner_forward = False
        return block.output.to(torch.float64) * mask[:, -ids.shape[1]:, None].to(torch.float64)

    def keys_of(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """Retrieval key of each prompt: the mean over all its tokens, as a (d,) tensor."""
        rows = [encode(self.model.tokenizer, p) for p in prompts]
        ids, mask = pad_right(rows, self.model.tokenizer.pad_token_id)
        device = self.model.device
        mask_t = torch.tensor(mask, device=device)
        sums = self.retrieval_outputs(torch.tensor(ids, device=device), mask_t).cumsum(1)
        means = sums / mask_t.cumsum(1).clamp_min(1).unsqueeze(-1)
        return [means[i, len(row) - 1].cpu() for i, row in enumerate(rows)]

    def _similarities(self, means: torch.Tensor) -> torch.Tensor:
        """(..., N) cosine of mean vectors (..., d) with every stored key."""
        keys = torch.nn.functional.normalize(
            torch.stack([e.key for e in self.entries]).to(means.device), dim=-1)
        return torch.nn.functional.normalize(means, dim=-1) @ keys.T

    def prefix_scores(self, ids: torch.Tensor, mask: torch.Tensor, follow: bool = False
                      ) -> tuple[torch.Tensor, dict[str, Any] | None]:
        """(B, N) float64: each stored edit's best similarity over the row's prefixes; with
        `follow`, also what `next_scores` needs to take one more position in."""
        cache = DynamicCache(config=self.model.model.config) if follow else None
        outputs = self.retrieval_outputs(ids, mask, cache)  # (B, T, d)
        count = mask.to(torch.float64).cumsum(1)
        sums = outputs.cumsum(1)
        sims = self._similarities(sums / count.clamp_min(1.0).unsqueeze(-1))  # (B, T, N)
        best = sims.masked_fill(~mask.bool().unsqueeze(-1), -2.0).max(dim=1).values
        state = {"sums": sums[:, -1], "count": count[:, -1], "cache": cache} if follow else None
        return best, state

    def next_scores(self, state: dict[str, Any], ids: torch.Tensor, mask: torch.Tensor,
                    positions: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """(B, N) similarities of each row's prefix ending at the one new position `ids`
        (B, 1), and the state taking it in (`mask`: the whole rows' mask so far)."""
        output = self.retrieval_outputs(ids, mask, state["cache"], positions)[:, 0]
        sums, count = state["sums"] + output, state["count"] + mask[:, -1].to(torch.float64)
        sims = self._similarities(sums / count.clamp_min(1.0).unsqueeze(-1))
        sims = sims.masked_fill(~mask[:, -1:].bool(), -2.0)
        return sims, {**state, "sums": sums, "count": count}

    def ranked(self, best: torch.Tensor) -> list[list[MemoryEntry]]:
        """Per row of `best` (B, N): the stored entries at or above the threshold, most
        similar first."""
        out = []
        for row in best.cpu():
            order = torch.argsort(row, descending=True, stable=True).tolist()
            out.append([self.entries[j] for j in order if row[j] >= self.threshold])
        return out

    def retrieve(self, ids: torch.Tensor, mask: torch.Tensor) -> list[list[MemoryEntry]]:
        """Per row: the stored entries with score >= threshold, most similar first."""
        if not self.entries:
            return [[] for _ in range(ids.shape[0])]
        return self.ranked(self.prefix_scores(ids, mask)[0])

    def context_ids(self, ranked: Sequence[MemoryEntry]) -> list[int]:
        """Token ids prepended to a row that retrieved `ranked` (empty: nothing retrieved)."""
        if not ranked:
            return []
        text = self.context(ranked[0].request, [e.request for e in ranked])
        return encode(self.model.tokenizer, text)

    # -- the attachment -----------------------------------------------------------------------
    def attachment(self) -> Attachment:
        base = self.model.model.base_model
        # Whole rows for `generate`; factedit's own generation follows the rows instead.
        return (Attachment(self.model.model, needs_full_sequence=True, rows=self._rows)
                .add_pre_hook(base, self._prepend_context)
                .add_forward_hook(base, self._drop_context_cache))

    def _prepend_context(self, _module: Any, args: tuple, kwargs: dict) -> tuple | None:
        self._context_applied = False
        if self._inner_forward or not self.entries:
            return None
        if len(args) > 1:
            raise AttachmentError(f"{self.config.method}: pass the base model's arguments "
                                  f"after input_ids by keyword")
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is None:
            raise AttachmentError(f"{self.config.method}: the memory is retrieved from "
                                  f"input_ids; call the model with input_ids, not inputs_embeds")
        rows = self._rows
        if rows.active and rows.state is not None:  # one new position per followed row
            return self._prepend_next(ids, kwargs)
        past = kwargs.get("cache", kwargs.get("past_key_values"))
        if past is not None and hasattr(past, "get_seq_length") and past.get_seq_length() > 0:
            raise AttachmentError(f"{self.config.method}: a KV cache cannot be continued past "
                                  f"a prepended context; generate with use_cache=False (the "
                                  f"default while a memory editor is attached)")
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        best, retrieval = self.prefix_scores(ids, mask, follow=rows.active)
        contexts = [self.context_ids(ranked) for ranked in self.ranked(best)]
        width = max(len(c) for c in contexts)
        batch, length = ids.shape
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(length, device=ids.device).expand(batch, length)
        pad = self.model.tokenizer.pad_token_id
        # Each distinct context runs once, left-padded to `width`; its keys and values are
        # then shared by every row that retrieved it (rows of one record usually retrieve
        # the same edit): the context tokens, not the rows, are most of the cost.
        distinct: dict[tuple, int] = {}
        for row, context in enumerate(contexts):
            if context:
                distinct.setdefault(self._cache_row_key(row, context), len(distinct))
        ctx_ids, ctx_mask, ctx_pos = [], [], []
        for key in distinct:
            context = key[1:]
            n_pad = width - len(context)
            ctx_ids.append([pad] * n_pad + list(context))
            ctx_mask.append([0] * n_pad + [1] * len(context))
            ctx_pos.append([0] * n_pad + list(range(len(context))))
        # Row r reads its context's cache row; a row without context reads row 0 masked out.
        which = [distinct[self._cache_row_key(row, c)] if c else 0
                 for row, c in enumerate(contexts)]
        prefix_mask = (mask.new_tensor(ctx_mask)[which] if distinct
                       else mask.new_zeros(batch, 0))
        prefix_mask[torch.tensor([not c for c in contexts], device=ids.device)] = 0
        shift = positions.new_tensor([len(c) for c in contexts]).unsqueeze(1)
        if rows.active:  # the prompt rows of a followed generation: what later steps need
            rows.state = {"best": best, "retrieval": retrieval, "prefix_mask": prefix_mask,
                          "shift": shift, "contexts": ids.new_tensor(
                              [[-1] * (width - len(c)) + c for c in contexts])}
        if width == 0:
            return None
        self._inner_forward = True  # the context's own forward is not rewritten
        try:
            cache = self.model.model.base_model(
                input_ids=ids.new_tensor(ctx_ids), attention_mask=mask.new_tensor(ctx_mask),
                position_ids=positions.new_tensor(ctx_pos), use_cache=True)[self._cache_field]
        finally:
            self._inner_forward = False
        cache.batch_select_indices(torch.tensor(which, device=ids.device))
        kwargs = {**kwargs, "input_ids": ids, "attention_mask": torch.cat([prefix_mask, mask], 1),
                  "position_ids": positions + shift, "use_cache": rows.active,
                  self._cache_field: cache}
        self._context_applied = True
        return (), kwargs

    def _prepend_next(self, ids: torch.Tensor, kwargs: dict) -> tuple | None:
        """A cached step of a followed generation (`models.attach.followed_rows`): the cache
        holds each row's context and its positions so far, so the new position only needs
        the context's mask and position shift. Retrieval takes the new prefix in; a row whose
        context would now differ has stale positions (they saw the old context): the
        tracker asks for the whole rows again."""
        rows = self._rows
        state = rows.state
        mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
        if ids.shape[1] != 1 or state["best"].shape[0] != ids.shape[0] or mask is None \
                or positions is None:
            raise AttachmentError(
                f"{self.config.method}: a followed generation must step one position per row "
                f"with its attention_mask and position_ids and say which rows leave (got "
                f"{tuple(ids.shape)} for {state['best'].shape[0]} rows)")
        sims, retrieval = self.next_scores(state["retrieval"], ids, mask, positions)
        best = torch.maximum(state["best"], sims.to(state["best"].dtype))
        stored = [[t for t in row if t >= 0] for row in state["contexts"].tolist()]
        if stored != [self.context_ids(ranked) for ranked in self.ranked(best)]:
            rows.rerun = True
        rows.state = {**state, "best": best, "retrieval": retrieval}
        if state["prefix_mask"].shape[1] == 0:
            return None
        kwargs = {**kwargs, "input_ids": ids,
                  "attention_mask": torch.cat([state["prefix_mask"], mask], 1),
                  "position_ids": positions + state["shift"], "use_cache": True}
        self._context_applied = True
        return (), kwargs

    def _cache_row_key(self, row: int, context: list[int]) -> tuple:
        """Rows with equal keys share one context forward: (-1, *context) when sharing,
        (row, *context) when every row runs its own."""
        return (-1 if self.config.share_contexts else row, *context)

    def _drop_context_cache(self, _module: Any, _args: tuple, _kwargs: dict, output: Any) -> Any:
        # The hidden states are the rows' own; the cache (context + rows) must not reach a
        # caller that would continue it: the context is prepended afresh at every forward.
        applied, self._context_applied = self._context_applied, False
        if not applied or self._inner_forward or self._rows.active:
            return None  # a followed generation continues the cache (context + rows)
        if isinstance(output, tuple):
            return tuple(None if x is _kwargs.get(self._cache_field) else x for x in output)
        if output.get(self._cache_field) is not None:
            output[self._cache_field] = None
        return output
