"""Key vectors and hidden states at the subject's last token.

k (ROME notation) for a request at layer l is the input of the MLP output projection at the
subject's last token, averaged over the context templates. All requests and templates go
through the model together (batched), and the forward pass stops after the deepest layer
asked for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..models import EditableModel, Trace, TraceDict, start_at_layer
from ..requests import EditRequest
from ..text import pad_right, subject_last_index


@dataclass
class SubjectRows:
    """Tokenised prompts: row r is template t(r) applied to request q(r)."""

    ids: list[list[int]]
    subject_index: list[int]  # position of the subject's last token in each row
    request_of_row: list[int]
    template_of_row: list[int]


def subject_rows(model: EditableModel, requests: Sequence[EditRequest],
                 templates: Sequence[str]) -> SubjectRows:
    """One row per (request, template): the token ids of the templated prompt and the index
    of its subject's last token, with which request and template each row came from."""
    rows = SubjectRows([], [], [], [])
    for qi, req in enumerate(requests):
        for ti, template in enumerate(templates):
            ids, idx = subject_last_index(model.tokenizer, template.format(req.prompt), req.subject)
            rows.ids.append(ids)
            rows.subject_index.append(idx)
            rows.request_of_row.append(qi)
            rows.template_of_row.append(ti)
    return rows


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


def capture_at_subject(
    model: EditableModel,
    rows: SubjectRows,
    module_names: Sequence[str],
    capture: str = "input",
    batch_size: int = 64,
) -> dict[str, torch.Tensor]:
    """Module inputs (or outputs) at each row's subject token: name -> (n_rows, d), float64."""
    if capture not in ("input", "output"):
        raise ValueError("capture must be 'input' or 'output'")
    out: dict[str, list[torch.Tensor]] = {name: [] for name in module_names}
    pad = model.tokenizer.pad_token_id
    with torch.inference_mode():
        for batch in _batches(len(rows.ids), batch_size):
            ids, mask = pad_right([rows.ids[r] for r in batch], pad)
            ids_t = torch.tensor(ids, device=model.device)
            mask_t = torch.tensor(mask, device=model.device)
            pos = torch.tensor([rows.subject_index[r] for r in batch], device=model.device)
            with TraceDict(model.model, module_names, retain_input=capture == "input",
                           retain_output=capture == "output", stop=True) as traces:
                model.model(input_ids=ids_t, attention_mask=mask_t, use_cache=False)
            for name in module_names:
                t = traces[name]
                acts = t.input if capture == "input" else t.output  # (B, T, d)
                out[name].append(acts[torch.arange(len(batch)), pos].to(torch.float64).cpu())
    return {name: torch.cat(chunks) for name, chunks in out.items()}


def average_per_request(values: torch.Tensor, rows: SubjectRows, n_requests: int) -> torch.Tensor:
    """Mean over templates: (n_rows, d) -> (n_requests, d)."""
    index = torch.tensor(rows.request_of_row)
    sums = torch.zeros(n_requests, values.shape[1], dtype=values.dtype)
    sums.index_add_(0, index, values)
    counts = torch.bincount(index, minlength=n_requests).to(values.dtype).unsqueeze(1)
    return sums / counts


def request_keys(keys: torch.Tensor, rows: SubjectRows, n_requests: int,
                 each: bool) -> torch.Tensor:
    """Keys read at every row, as the solve takes them: one per template (`each`, the rows
    are already request-major) or their mean per request."""
    return keys if each else average_per_request(keys, rows, n_requests)


def compute_keys(
    model: EditableModel,
    requests: Sequence[EditRequest],
    layers: Sequence[int],
    templates: Sequence[str],
    batch_size: int = 64,
    each: bool = False,
) -> dict[int, torch.Tensor]:
    """Keys k_i at each layer: layer -> (n_requests, d_in) float64 on CPU, the mean over
    templates; `each`: one key per template instead, (n_requests * n_templates, d_in),
    request-major (row r belongs to request r // n_templates)."""
    rows = subject_rows(model, requests, templates)
    names = {layer: model.arch.mlp_out_at(model.check_layer(layer)) for layer in layers}
    acts = capture_at_subject(model, rows, list(names.values()), "input", batch_size)
    return {layer: request_keys(acts[name], rows, len(requests), each)
            for layer, name in names.items()}


def hidden_at_subject(
    model: EditableModel, requests: Sequence[EditRequest], layer: int, batch_size: int = 64
) -> torch.Tensor:
    """Residual stream after block `layer` at the subject token of the bare prompt: (n, d)."""
    rows = subject_rows(model, requests, ["{}"])
    name = model.arch.layer(model.check_layer(layer))
    return capture_at_subject(model, rows, [name], "output", batch_size)[name]


class LayerByLayerReads:
    """Keys of each edited layer and h at z's site, read as MEMIT's loop writes the layers.

    With residual="per_layer" the loop writes l_0, reads K and h, writes l_1, reads again...
    Writing l_{j-1} changes nothing below block l_{j-1}, so the pass for l_j starts at block
    l_{j-1} from the block input the previous pass kept (`start_at_layer`), and one pass
    yields both the keys at l_j (over the key templates) and h (the rows of the bare
    template, every template list's first), where reading them apart took two passes from
    the embeddings. For layers 2-8 (of 30) and bare prompts: 30 block passes per edit, not 96.

    The kept input stays valid while only blocks at or above the last layer read change:
    `read` must be called with increasing layers, each after the layer before it is written.
    It holds every row's hidden states (rows x tokens x d); past `keep_bytes` (a large batch
    edit of a large model) nothing is kept and each pass starts at the embeddings again.
    """

    def __init__(self, model: EditableModel, requests: Sequence[EditRequest],
                 templates: Sequence[str], z_layer: int, site_name: str,
                 batch_size: int = 64, keep_bytes: int = 2**30) -> None:
        if not templates or templates[0] != "{}":
            raise ValueError(f"templates must start with the bare prompt '{{}}', got {templates!r}")
        self.model, self.n_requests, self.site_name = model, len(requests), site_name
        self.z_layer = model.check_layer(z_layer)
        self.rows = subject_rows(model, requests, templates)
        self._bare = torch.tensor([t == 0 for t in self.rows.template_of_row])
        pad = model.tokenizer.pad_token_id
        self._batches = []
        for batch in _batches(len(self.rows.ids), batch_size):
            ids, mask = pad_right([self.rows.ids[r] for r in batch], pad)
            self._batches.append((torch.tensor(ids, device=model.device),
                                  torch.tensor(mask, device=model.device),
                                  torch.tensor([self.rows.subject_index[r] for r in batch])))
        self._kept: tuple[int, list[torch.Tensor]] | None = None  # (block, its inputs)
        self.keep_bytes = keep_bytes

    def read(self, layer: int, with_site: bool = True, each: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """K at `layer` (n_requests, d_in; `each`: one row per template, request-major, as
        `compute_keys`) and, with `with_site`, h (n_requests, d): float64."""
        model = self.model
        layer = model.check_layer(layer)
        start, kept = self._kept if self._kept is not None else (None, None)
        if start is not None and start >= layer:
            raise ValueError(f"read layer {layer} after layer {start}: layers must increase")
        key_name, block_name = model.arch.mlp_out_at(layer), model.arch.layer(layer)
        # Stop after the block holding the last thing read (z's site may sit below the key
        # at the last layer: the attention output precedes the MLP).
        stop_name = model.arch.layer(max(layer, self.z_layer) if with_site else layer)
        keys, sites, inputs = [], [], []
        with torch.inference_mode():
            for b, (ids, mask, pos) in enumerate(self._batches):
                with contextlib.ExitStack() as stack:
                    if start is not None:
                        stack.enter_context(start_at_layer(model.layers, start, kept[b],
                                                           model.block_returns_tuple))
                    key = stack.enter_context(Trace(model.model, key_name, retain_input=True))
                    block = stack.enter_context(Trace(model.model, block_name,
                                                      retain_input=True))
                    site = (stack.enter_context(Trace(model.model, self.site_name,
                                                      retain_output=True))
                            if with_site else None)
                    # Registered last, so its hook runs after the others' on a shared module.
                    stack.enter_context(Trace(model.model, stop_name, stop=True))
                    model.model(input_ids=ids, attention_mask=mask, use_cache=False)
                rows = torch.arange(len(pos))
                keys.append(key.input[rows, pos].to(torch.float64).cpu())
                inputs.append(block.input)
                if site is not None:
                    sites.append(site.output[rows, pos].to(torch.float64).cpu())
        kept_bytes = sum(x.numel() * x.element_size() for x in inputs)
        self._kept = (layer, inputs) if kept_bytes <= self.keep_bytes else None
        K = request_keys(torch.cat(keys), self.rows, self.n_requests, each)
        h = torch.cat(sites)[self._bare] if with_site else None
        return K, h
