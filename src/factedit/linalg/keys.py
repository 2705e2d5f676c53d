"""Key vectors and hidden states at the subject's last token.

k (ROME notation) for a request at layer l is the input of the MLP output projection at the
subject's last token, averaged over the context templates. All requests and templates go
through the model together (batched), and the forward pass stops after the deepest layer
asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..models import EditableModel, TraceDict
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


def compute_keys(
    model: EditableModel,
    requests: Sequence[EditRequest],
    layers: Sequence[int],
    templates: Sequence[str],
    batch_size: int = 64,
) -> dict[int, torch.Tensor]:
    """Keys k_i at each layer: layer -> (n_requests, d_in) float64 on CPU."""
    rows = subject_rows(model, requests, templates)
    names = {layer: model.arch.mlp_out_at(model.check_layer(layer)) for layer in layers}
    acts = capture_at_subject(model, rows, list(names.values()), "input", batch_size)
    return {layer: average_per_request(acts[name], rows, len(requests))
            for layer, name in names.items()}


def hidden_at_subject(
    model: EditableModel, requests: Sequence[EditRequest], layer: int, batch_size: int = 64
) -> torch.Tensor:
    """Residual stream after block `layer` at the subject token of the bare prompt: (n, d)."""
    rows = subject_rows(model, requests, ["{}"])
    name = model.arch.layer(model.check_layer(layer))
    return capture_at_subject(model, rows, [name], "output", batch_size)[name]
