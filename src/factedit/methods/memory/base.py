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

Subclasses implement `context(best, ranked)`: the text prepended for a row whose best
edit is `best` (`ranked`: every edit above the threshold, most similar first).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...models import EditableModel, Trace
from ...models.attach import Attachment, AttachmentError
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
    def prefix_means(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, d) float64: mean of block `retrieval_layer`'s output over real tokens <= t."""
        model = self.model
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
        self._inner_forward = True
        try:
            with torch.no_grad(), Trace(model.model, model.arch.layer(self.retrieval_layer),
                                        retain_output=True, stop=True) as block:
                model.model.base_model(input_ids=ids, attention_mask=mask,
                                       position_ids=positions, use_cache=False)
        finally:
            self._inner_forward = False
        weight = mask.to(torch.float64).unsqueeze(-1)           # (B, T, 1)
        sums = (block.output.to(torch.float64) * weight).cumsum(1)
        return sums / weight.cumsum(1).clamp_min(1.0)

    def keys_of(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """Retrieval key of each prompt: the mean over all its tokens, as a (d,) tensor."""
        rows = [encode(self.model.tokenizer, p) for p in prompts]
        ids, mask = pad_right(rows, self.model.tokenizer.pad_token_id)
        device = self.model.device
        means = self.prefix_means(torch.tensor(ids, device=device),
                                  torch.tensor(mask, device=device))
        return [means[i, len(row) - 1].cpu() for i, row in enumerate(rows)]

    def retrieve(self, ids: torch.Tensor, mask: torch.Tensor) -> list[list[MemoryEntry]]:
        """Per row: the stored entries with score >= threshold, most similar first."""
        if not self.entries:
            return [[] for _ in range(ids.shape[0])]
        means = torch.nn.functional.normalize(self.prefix_means(ids, mask), dim=-1)
        keys = torch.nn.functional.normalize(
            torch.stack([e.key for e in self.entries]).to(means.device), dim=-1)
        sims = torch.einsum("btd,nd->btn", means, keys)         # (B, T, N)
        sims = sims.masked_fill(~mask.bool().unsqueeze(-1), -2.0)
        best = sims.max(dim=1).values.cpu()                      # (B, N)
        out = []
        for row in best:
            order = torch.argsort(row, descending=True, stable=True).tolist()
            out.append([self.entries[j] for j in order if row[j] >= self.config.threshold])
        return out

    def context_ids(self, ranked: Sequence[MemoryEntry]) -> list[int]:
        """Token ids prepended to a row that retrieved `ranked` (empty: nothing retrieved)."""
        if not ranked:
            return []
        text = self.context(ranked[0].request, [e.request for e in ranked])
        return encode(self.model.tokenizer, text)

    # -- the attachment -----------------------------------------------------------------------
    def attachment(self) -> Attachment:
        base = self.model.model.base_model
        return (Attachment(self.model.model, needs_full_sequence=True)
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
        past = kwargs.get("cache", kwargs.get("past_key_values"))
        if past is not None and hasattr(past, "get_seq_length") and past.get_seq_length() > 0:
            raise AttachmentError(f"{self.config.method}: a KV cache cannot be continued past "
                                  f"a prepended context; generate with use_cache=False (the "
                                  f"default while a memory editor is attached)")
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        contexts = [self.context_ids(ranked) for ranked in self.retrieve(ids, mask)]
        width = max(len(c) for c in contexts)
        if width == 0:
            return None
        batch, length = ids.shape
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(length, device=ids.device).expand(batch, length)
        # Each distinct context runs once, left-padded to `width`; its keys and values are
        # then shared by every row that retrieved it (rows of one record usually retrieve
        # the same edit): the context tokens, not the rows, are most of the cost.
        distinct: dict[tuple, int] = {}
        for row, context in enumerate(contexts):
            if context:
                distinct.setdefault(self._cache_row_key(row, context), len(distinct))
        pad = self.model.tokenizer.pad_token_id
        ctx_ids, ctx_mask, ctx_pos = [], [], []
        for key in distinct:
            context = key[1:]
            n_pad = width - len(context)
            ctx_ids.append([pad] * n_pad + list(context))
            ctx_mask.append([0] * n_pad + [1] * len(context))
            ctx_pos.append([0] * n_pad + list(range(len(context))))
        self._inner_forward = True  # the context's own forward is not rewritten
        try:
            cache = self.model.model.base_model(
                input_ids=ids.new_tensor(ctx_ids), attention_mask=mask.new_tensor(ctx_mask),
                position_ids=positions.new_tensor(ctx_pos), use_cache=True)[self._cache_field]
        finally:
            self._inner_forward = False
        # Row r reads its context's cache row; a row without context reads row 0 masked out.
        which = [distinct[self._cache_row_key(row, c)] if c else 0
                 for row, c in enumerate(contexts)]
        cache.batch_select_indices(torch.tensor(which, device=ids.device))
        prefix_mask = mask.new_tensor(ctx_mask)[which]
        prefix_mask[torch.tensor([not c for c in contexts], device=ids.device)] = 0
        shift = positions.new_tensor([len(c) for c in contexts]).unsqueeze(1)
        kwargs = {**kwargs, "input_ids": ids, "attention_mask": torch.cat([prefix_mask, mask], 1),
                  "position_ids": positions + shift, "use_cache": False,
                  self._cache_field: cache}
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
        if not applied or self._inner_forward:
            return None
        if isinstance(output, tuple):
            return tuple(None if x is _kwargs.get(self._cache_field) else x for x in output)
        if output.get(self._cache_field) is not None:
            output[self._cache_field] = None
        return output
