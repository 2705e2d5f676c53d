"""Target values: the vector that, written at the subject token, makes the model say target_new.

ROME's v* and MEMIT's z are the same optimisation at different sites:
- site "mlp_out": delta is added to the output of layer l's MLP output projection (ROME);
- site "attn_out": delta is added to the output of layer l's attention output projection;
- site "residual": delta is added to the residual stream after block l (MEMIT, D4S, ...).
For request i, delta_i is found by Adam on

    loss_i = mean_rows NLL(target_new | template(prompt) with delta_i at the subject token)
             + kl_factor * KL(p_0 || p_delta) on "{subject} is a" at the subject token
             + weight_decay * ||delta_i|| / ||h_i||^2
             + true_factor * mean_rows -log(1 - p(target_true's first token | ...))

The last term (off by default: true_factor=0) is an unlikelihood term on the old answer:
teacher-forced scores only ask p(target_new) > p(target_true), greedy text asks target_new
to be the argmax, so it also pushes the old answer's first token down (skipped where the two
answers start with the same token).

with ||delta_i|| <= clamp_factor * ||h_i|| (h_i: the site's value on the bare prompt).
`optimise_joint_target_values` optimises one delta per site at once (PMET: attention and MLP
outputs of the same layer); the weight-decay term is then summed over the sites and each
delta is clamped against its own site's norm.

All requests of a batch are optimised together: one forward pass per step over every row of
every request. Adam is element-wise and each delta_i only touches its own rows, so this equals
optimising them one at a time; a request that reaches the NLL threshold is frozen (early
stop). The layers below l are not recomputed at each step: their output is cached once and
fed in with `start_at_layer`; the LM head runs only at target-token positions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..models import EditableModel, Trace, TraceDict, frozen, start_at_layer
from ..requests import EditRequest
from ..text import continuation_ids, pad_right, subject_last_index

log = logging.getLogger(__name__)

KL_TEMPLATE = "{} is a"


@dataclass
class TargetValues:
    """delta (n, d) at `site` of `layer`; init (n, d) the site's unedited value (bare prompt)."""

    layer: int
    site: str
    delta: torch.Tensor
    init: torch.Tensor
    final_nll: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)

    @property
    def target(self) -> torch.Tensor:
        return self.init + self.delta

    def split(self) -> list[TargetValues]:
        """One TargetValues per request (rows of delta and init)."""
        return [TargetValues(self.layer, self.site, self.delta[i:i + 1], self.init[i:i + 1],
                             self.final_nll[i:i + 1], self.steps[i:i + 1])
                for i in range(self.delta.shape[0])]

    @staticmethod
    def in_request_order(parts: Iterable[tuple[Sequence[int], TargetValues]]) -> TargetValues:
        """One TargetValues from batches optimised in another order (`value_batches`): each
        part is (the requests' indices, their values); the result follows the indices."""
        per_request: dict[int, TargetValues] = {}
        for indices, values in parts:
            per_request.update(zip(indices, values.split()))
        return TargetValues.concat([per_request[i] for i in sorted(per_request)])

    @staticmethod
    def concat(parts: Sequence[TargetValues]) -> TargetValues:
        """The requests of `parts` in order, as one TargetValues (same layer and site)."""
        first = parts[0]
        if any((p.layer, p.site) != (first.layer, first.site) for p in parts):
            raise ValueError("TargetValues.concat: parts come from different layers or sites")
        return TargetValues(first.layer, first.site,
                            torch.cat([p.delta for p in parts]), torch.cat([p.init for p in parts]),
                            [x for p in parts for x in p.final_nll],
                            [x for p in parts for x in p.steps])


@dataclass
class _Rows:
    ids: list[list[int]]
    subject_index: list[int]
    request: list[int]
    target_pos: list[list[int]]  # positions whose next-token prediction is a target token
    target_ids: list[list[int]]
    is_kl: list[bool]
    is_bare: list[bool]


def _build_rows(model: EditableModel, requests: Sequence[EditRequest],
                templates: Sequence[str]) -> _Rows:
    tok = model.tokenizer
    rows = _Rows([], [], [], [], [], [], [])
    for qi, req in enumerate(requests):
        target = continuation_ids(tok, req.rewrite_prompt, req.target_new)
        for ti, template in enumerate(templates):
            ctx_ids, idx = subject_last_index(tok, template.format(req.prompt), req.subject)
            ids = ctx_ids + target[:-1]  # teacher forcing: predict target[j] at len(ctx)-1+j
            rows.ids.append(ids)
            rows.subject_index.append(idx)
            rows.request.append(qi)
            rows.target_pos.append([len(ctx_ids) - 1 + j for j in range(len(target))])
            rows.target_ids.append(target)
            rows.is_kl.append(False)
            rows.is_bare.append(ti == 0)
        kl_ids, kl_idx = subject_last_index(tok, KL_TEMPLATE, req.subject)
        rows.ids.append(kl_ids)
        rows.subject_index.append(kl_idx)
        rows.request.append(qi)
        rows.target_pos.append([])
        rows.target_ids.append([])
        rows.is_kl.append(True)
        rows.is_bare.append(False)
    return rows


def value_batches(model: EditableModel, requests: Sequence[EditRequest],
                  size: int) -> list[list[int]]:
    """Indices of `requests` in batches of `size` for the batched value optimisation, the
    requests ordered by the length of their rows from the subject's last token on (then by
    the prompt's length; ties keep their order).

    A step runs every target row of a batch padded to the batch's longest suffix: on the
    first 1,000 CounterFact records in batches of 32, 41% of those positions are padding in
    request order, 2% ordered by length (docs/results/cheaper-values). Each delta_i depends on
    its own rows only, so the order changes the values only to rounding. Deterministic: the
    same requests give the same batches, whatever ran before.
    """
    if size < 1:
        raise ValueError(f"value batch size must be >= 1, got {size}")
    tok = model.tokenizer

    def length(i: int) -> tuple[int, int]:
        req = requests[i]
        ids, subject = subject_last_index(tok, req.prompt, req.subject)
        target = continuation_ids(tok, req.rewrite_prompt, req.target_new)
        return len(ids) - subject + len(target), len(ids)

    order = sorted(range(len(requests)), key=length)
    return [order[i:i + size] for i in range(0, len(order), size)]


def _true_first_token(model: EditableModel, request: EditRequest) -> int:
    """target_true's first continuation token, or -1 where there is none or it is also
    target_new's first token (pushing it down would push the new answer down too)."""
    if not request.target_true:
        return -1
    tok = model.tokenizer
    old = continuation_ids(tok, request.rewrite_prompt, request.target_true)[0]
    return -1 if old == continuation_ids(tok, request.rewrite_prompt, request.target_new)[0] else old


def _split_at_subject(model: EditableModel, ids: torch.Tensor, mask: torch.Tensor,
                      hidden: torch.Tensor, subj: torch.Tensor) -> dict[str, Any] | None:
    """Rows cut at their subject token s_r: the suffix [s_r, len_r) right-padded (ids, mask,
    the block input `hidden`, true positions s_r + j), and the prefix [0, s_r) left-padded
    to P = max s_r and run once through the whole model for its keys and values ("kv", one
    (keys, values) pair per layer, padding zeroed; "prefix_mask"). The suffix then attends
    to the prefix as a cache: query j sits at cache position P + j, causal over both parts,
    with rotary/learned positions from `positions`. None where the model's cache has
    layers other than plain full-attention ones."""
    device = ids.device
    n_rows = ids.shape[0]
    lengths = mask.sum(1)
    width = int((lengths - subj).max())
    j = torch.arange(width, device=device)
    src = (subj.unsqueeze(1) + j).clamp(max=ids.shape[1] - 1)
    suffix_mask = (subj.unsqueeze(1) + j < lengths.unsqueeze(1)).to(mask.dtype)
    rows = torch.arange(n_rows, device=device).unsqueeze(1)
    suffix_ids = torch.where(suffix_mask.bool(), ids[rows, src], ids[rows, src].new_tensor(0))
    suffix_hidden = hidden[rows, src] * suffix_mask.unsqueeze(-1).to(hidden.dtype)
    n_prefix = int(subj.max())
    i = torch.arange(n_prefix, device=device)
    offset = (n_prefix - subj).unsqueeze(1)  # left padding of each row
    prefix_mask = (i >= offset).to(mask.dtype)
    prefix_pos = (i - offset).clamp(min=0)
    prefix_ids = torch.where(prefix_mask.bool(), ids[rows, prefix_pos], ids.new_tensor(0))
    with torch.no_grad():  # not inference mode: the steps' backward reads these tensors
        cache = model.model.base_model(input_ids=prefix_ids, attention_mask=prefix_mask,
                                       position_ids=prefix_pos, use_cache=True)[model.cache_field]
    if any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None  # sliding-window layers (Gemma 3) keep a cut cache: run whole rows
    keep = prefix_mask.bool()[:, None, :, None]
    kv = [(torch.where(keep, layer.keys, 0.0), torch.where(keep, layer.values, 0.0))
          for layer in cache.layers]
    return {"ids": suffix_ids, "mask": suffix_mask, "hidden": suffix_hidden.clone(),
            "positions": subj.unsqueeze(1) + j, "prefix_mask": prefix_mask, "kv": kv}


SITES = ("mlp_out", "attn_out", "residual")
STEP_RULES = ("adam", "sphere")
# Open requests from which the KL rows run as their own forward (see kl_apart_from).
KL_APART_FROM = 16
# A locate config's `value_rule`: "adam" is the optimisation as configured (v_steps, v_lr);
# "fast" runs the same objective with the prefix cache, Adam at FAST_LR and at most
# FAST_MAX_STEPS steps (docs/results/cheaper-values).
VALUE_RULES = ("adam", "fast")
FAST_LR = 2.0
FAST_MAX_STEPS = 8


def value_rule_options(value_rule: str, options: dict[str, Any]) -> dict[str, Any]:
    """`optimise_joint_target_values` keywords for a config's value_rule: "adam" returns
    `options` unchanged (so cached values of before keep their keys; the optimiser's prefix
    cache is on by default and gives them to rounding); "fast" also names the prefix cache
    (its key since it was added) and replaces lr and steps by FAST_LR and
    min(steps, FAST_MAX_STEPS)."""
    if value_rule not in VALUE_RULES:
        raise ValueError(f"value_rule must be one of {VALUE_RULES}, got {value_rule!r}")
    if value_rule == "adam":
        return dict(options)
    return {**options, "lr": FAST_LR, "steps": min(int(options["steps"]), FAST_MAX_STEPS),
            "prefix_cache": True}


def _sphere_step(delta: torch.Tensor, radius: torch.Tensor, open_req: torch.Tensor,
                 turn: float) -> None:
    """One "sphere" step in place on the rows `open_req` of delta (n, d) (its .grad set).

    From delta = 0 the step is the closed form delta = -radius * g / ||g||: the first-order
    best point of the sphere ||delta|| = radius. From a point u * radius of the sphere it
    turns the direction, u <- normalise(u - turn * g / ||g||), and keeps the radius: the
    clamp binds for most requests under Adam too (bench/cache values: median ||delta|| / ||h||
    0.71 of the 0.75 clamp), so the search is over directions only.
    """
    grad = delta.grad[open_req]
    g_unit = grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-12)
    now = delta[open_req]
    norms = now.norm(dim=1, keepdim=True)
    u = torch.where(norms > 0, now / norms.clamp_min(1e-12), torch.zeros_like(now))
    turned = torch.where(norms > 0, u - turn * g_unit, -g_unit)
    turned = turned / turned.norm(dim=1, keepdim=True).clamp_min(1e-12)
    delta[open_req] = turned * radius[open_req]


def site_module_name(model: EditableModel, layer: int, site: str) -> str:
    """The module whose output is the value at `site` of `layer`."""
    if site == "mlp_out":
        return model.arch.mlp_out_at(layer)
    if site == "attn_out":
        return model.arch.attn_out_at(layer)
    if site == "residual":
        return model.arch.layer(layer)
    raise ValueError(f"site must be one of {SITES}, got {site!r}")


def optimise_target_values(
    model: EditableModel,
    requests: Sequence[EditRequest],
    layer: int,
    site: str,
    templates: Sequence[str],
    **options: Any,
) -> TargetValues:
    """Find delta_i for every request at one site (see module docstring). Weights untouched.

    `options` are `optimise_joint_target_values`'s keywords (steps, lr, weight_decay,
    clamp_factor, kl_factor, early_stop_nll).
    """
    return optimise_joint_target_values(model, requests, layer, (site,), templates,
                                        **options)[site]


def optimise_joint_target_values(
    model: EditableModel,
    requests: Sequence[EditRequest],
    layer: int,
    sites: Sequence[str],
    templates: Sequence[str],
    *,
    steps: int = 25,
    lr: float = 0.5,
    weight_decay: float = 0.5,
    clamp_factor: float = 4.0,
    kl_factor: float = 0.0625,
    early_stop_nll: float = 0.05,
    true_factor: float = 0.0,
    step_rule: str = "adam",
    sphere_step: float = 0.5,
    prefix_cache: bool = True,
    kl_apart_from: int = KL_APART_FROM,
) -> dict[str, TargetValues]:
    """One delta per site and request, optimised together: site -> TargetValues.

    step_rule "adam": `steps` Adam steps of size `lr` (ROME/MEMIT), delta clamped into the
    ball. step_rule "sphere": delta jumps at once onto the clamp sphere ||delta|| = clamp_factor ||h||
    along the loss's negative gradient at delta = 0 (the closed-form first step), then each
    further step turns it on that sphere by `sphere_step` (radians-like: the unit direction
    moves by sphere_step times the unit negative gradient, then is normalised again).

    prefix_cache: each step runs only the positions from the subject's last token on
    against keys and values of the earlier positions computed once (`_split_at_subject`):
    delta enters at the subject token, so nothing before it changes between steps. The
    same values to rounding; ~60% of a CounterFact row lies before that token, and it cuts
    a value's CPU time 2.3x (docs/results/cheaper-values). On by default; it is not one of
    the value cache's key options, since it does not change the values beyond rounding.

    kl_apart_from: while at least this many requests are open, the KL rows (read at their
    subject token only) run as a second forward cut after that token instead of padded to
    the longest target row: one CPU thread, headline value options, 2.54 -> 2.14 s a value
    in batches of 32; even at 8; 3.9 -> 4.9 s alone, where the second pass's fixed cost
    outweighs it (docs/results/cheaper-values). The same values to rounding; like
    prefix_cache, not a cache key. 0: always; a large number: never.
    """
    if step_rule not in STEP_RULES:
        raise ValueError(f"step_rule must be one of {STEP_RULES}, got {step_rule!r}")
    model.check_layer(layer)
    sites = list(dict.fromkeys(sites))
    rows = _build_rows(model, requests, templates)
    device = model.device
    n_req, n_rows = len(requests), len(rows.ids)
    pad = model.tokenizer.pad_token_id
    ids, mask = pad_right(rows.ids, pad)
    ids_t = torch.tensor(ids, device=device)
    mask_t = torch.tensor(mask, device=device)
    row_req = torch.tensor(rows.request, device=device)
    subj = torch.tensor(rows.subject_index, device=device)
    arange = torch.arange(n_rows, device=device)
    site_names = [site_module_name(model, layer, site) for site in sites]
    base = model.model.base_model

    # Flattened target positions: (row, position, token) for the NLL, one entry per token.
    t_row = torch.tensor([r for r in range(n_rows) for _ in rows.target_pos[r]], device=device)
    t_pos = torch.tensor([p for r in range(n_rows) for p in rows.target_pos[r]], device=device)
    t_tok = torch.tensor([t for r in range(n_rows) for t in rows.target_ids[r]], device=device)
    row_counts = torch.tensor([max(1, len(p)) for p in rows.target_pos], device=device)
    # The old answer's first token at each row's first target position (-1: no term there).
    true_first = [_true_first_token(model, r) for r in requests]
    t_true = torch.tensor([true_first[rows.request[r]] if j == 0 else -1
                           for r in range(n_rows) for j in range(len(rows.target_pos[r]))],
                          dtype=torch.long, device=device)
    kl_rows = torch.tensor([r for r in range(n_rows) if rows.is_kl[r]], device=device)
    nll_rows_per_req = torch.bincount(row_req[~torch.tensor(rows.is_kl, device=device)],
                                      minlength=n_req).float()

    # Cache what enters block `layer` (the layers below never change during optimisation),
    # and each site's unedited value at the subject token of every row. The pass stops
    # after the block, i.e. after every site inside it.
    with torch.inference_mode():
        with TraceDict(model.model, site_names, retain_output=True) as site_out, \
             Trace(model.model, model.arch.layer(layer), retain_input=True, stop=True) as block_in:
            model.model(input_ids=ids_t, attention_mask=mask_t, use_cache=False)
    # Cloned outside inference mode so autograd may use it as an ordinary input.
    hidden_in = block_in.input.clone()
    bare = torch.tensor(rows.is_bare, device=device)
    inits, deltas, max_norms = [], [], []
    for name in site_names:
        site_values = site_out[name].output[arange, subj].float().clone()
        init = torch.zeros(n_req, site_values.shape[1], device=device)
        init[row_req[bare]] = site_values[bare]
        inits.append(init)
        max_norms.append(clamp_factor * init.norm(dim=1, keepdim=True))
        deltas.append(torch.zeros_like(init, requires_grad=True))
    delta_of = dict(zip(site_names, deltas))
    prefix = None
    if prefix_cache and int(subj.max()) > 0:
        prefix = _split_at_subject(model, ids_t, mask_t, hidden_in, subj)
    if prefix is not None:
        ids_t, mask_t, hidden_in = prefix["ids"], prefix["mask"], prefix["hidden"]
        t_pos = t_pos - subj[t_row]
        subj = torch.zeros_like(subj)

    optimiser = torch.optim.Adam(deltas, lr=lr)
    converged = torch.zeros(n_req, dtype=torch.bool, device=device)
    steps_taken = [steps] * n_req
    kl_req = row_req[kl_rows]  # the request of each KL row
    kl_init = torch.empty(0)
    last_nll = torch.zeros(n_req, device=device)

    is_kl = torch.tensor(rows.is_kl, device=device)
    # A KL row is read at its subject token only: the positions after it change nothing
    # there (causal attention), so it runs apart, cut after the subject, instead of padded
    # to the batch's longest target row (a quarter of the rows of a step).
    lengths = torch.where(is_kl, subj + 1, mask_t.sum(1))

    def pass_inputs(rows_in: torch.Tensor) -> dict[str, Any]:
        """One forward's inputs: the rows `rows_in` (indices into all rows), right-padded
        to the longest of them."""
        width = int(lengths[rows_in].max())
        if prefix is not None:
            extra = {"position_ids": prefix["positions"][rows_in, :width], "use_cache": True,
                     "attention_mask": torch.cat([prefix["prefix_mask"][rows_in],
                                                  mask_t[rows_in, :width]], dim=1)}
            kv = [(k[rows_in], v[rows_in]) for k, v in prefix["kv"]]
        else:
            extra, kv = {"attention_mask": mask_t[rows_in, :width], "use_cache": False}, None
        return dict(ids=ids_t[rows_in, :width], extra=extra, kv=kv,
                    hidden=hidden_in[rows_in, :width], subj=subj[rows_in],
                    row_req=row_req[rows_in])

    def open_rows(open_req: torch.Tensor) -> dict[str, Any]:
        """The rows of the requests still being optimised, re-indexed from 0, in one or two
        forward passes ("passes": the target rows, then the KL rows, when at least
        `kl_apart_from` requests are open).

        A request that reached the NLL threshold leaves the forward pass: its delta is final,
        so the rest of the batch no longer pays for its rows (a batch would otherwise cost
        its slowest request's steps times every row).
        """
        keep = torch.nonzero(open_req[row_req]).flatten()
        renumber = torch.full((n_rows,), -1, dtype=torch.long, device=device)
        renumber[keep] = torch.arange(len(keep), device=device)
        t_keep = open_req[row_req[t_row]]
        kl_keep = open_req[kl_req]
        apart = int(open_req.sum()) >= kl_apart_from
        groups = [keep[~is_kl[keep]], keep[is_kl[keep]]] if apart else [keep]
        return dict(passes=[(renumber[g], pass_inputs(g)) for g in groups if len(g)],
                    width=int(lengths[keep].max()), subj=subj[keep], row_req=row_req[keep],
                    arange=torch.arange(len(keep), device=device),
                    t_row=renumber[t_row[t_keep]], t_pos=t_pos[t_keep], t_tok=t_tok[t_keep],
                    t_true=t_true[t_keep],
                    row_tokens=row_counts[keep].float(),
                    kl_rows=renumber[kl_rows[kl_keep]], kl_req=kl_req[kl_keep])

    act = open_rows(~converged)
    current: dict[str, Any] = {}  # the pass under way, for add_delta

    def add_delta(output: torch.Tensor, name: str) -> torch.Tensor:
        # Out-of-place: autograd must see delta enter at the subject token of each row.
        add = torch.zeros_like(output)
        add[torch.arange(output.shape[0], device=device), current["subj"]] = \
            delta_of[name][current["row_req"]].to(output.dtype)
        return output + add

    def forward() -> torch.Tensor:
        """(open rows, width, d): the last hidden states of every open row, each pass's
        rows placed back in the open rows' order (a KL row's positions after its subject
        stay zero: nothing reads them)."""
        out = None
        for where, inputs in act["passes"]:
            current.update(inputs)
            with start_at_layer(model.layers, layer, inputs["hidden"],
                                model.block_returns_tuple), \
                 TraceDict(model.model, site_names, edit_output=add_delta, detach=False):
                if inputs["kv"] is not None:  # a fresh cache: every pass appends to its own
                    inputs["extra"][model.cache_field] = DynamicCache(
                        ddp_cache_data=inputs["kv"], config=model.model.config)
                hidden = base(input_ids=inputs["ids"], **inputs["extra"]).last_hidden_state
            if len(act["passes"]) == 1:
                return hidden
            if out is None:
                out = hidden.new_zeros(len(act["arange"]), act["width"], hidden.shape[-1])
            out = out.index_put((where[:, None], torch.arange(hidden.shape[1], device=device)),
                                hidden)
        return out

    # No parameter gradients: only the deltas are optimised. Without this, every step also
    # back-propagates into each weight above `layer` and the (vocab x d) embedding/head
    # matrix, which is most of the backward pass.
    with frozen(model.model):
        for step in range(steps):
            optimiser.zero_grad()
            hidden = forward()
            logits = model.head_logits(hidden[act["t_row"], act["t_pos"]]).float()
            tok_nll = -torch.log_softmax(logits, dim=-1).gather(
                1, act["t_tok"].unsqueeze(1)).squeeze(1)
            row_nll = (torch.zeros(len(act["arange"]), device=device)
                       .index_add(0, act["t_row"], tok_nll) / act["row_tokens"])
            req_nll = (torch.zeros(n_req, device=device)
                       .index_add(0, act["row_req"], row_nll) / nll_rows_per_req)
            kl_rows_now = act["kl_rows"]
            kl_logp = torch.log_softmax(
                model.head_logits(hidden[kl_rows_now, act["subj"][kl_rows_now]]).float(), dim=-1)
            if step == 0:  # every request is open: one KL row per request, in order
                kl_init = kl_logp.detach()
            req_kl = torch.zeros(n_req, device=device).index_add(
                0, act["kl_req"], F.kl_div(kl_logp, kl_init[act["kl_req"]], log_target=True,
                                           reduction="none").sum(-1))
            req_wd = sum(weight_decay * d.norm(dim=1) / i.norm(dim=1).clamp_min(1e-8) ** 2
                         for d, i in zip(deltas, inits))
            if true_factor:
                first = act["t_true"] >= 0
                p_true = torch.softmax(logits[first], dim=-1).gather(
                    1, act["t_true"][first].unsqueeze(1)).squeeze(1)
                row_ul = torch.zeros(len(act["arange"]), device=device).index_add(
                    0, act["t_row"][first], -torch.log1p(-p_true.clamp(max=1 - 1e-6)))
                req_true = torch.zeros(n_req, device=device).index_add(
                    0, act["row_req"], row_ul) / nll_rows_per_req
            else:
                req_true = torch.zeros(n_req, device=device)
            last_nll = torch.where(converged, last_nll, req_nll.detach())
            newly_done = (last_nll < early_stop_nll) & ~converged
            for i in torch.nonzero(newly_done).flatten().tolist():
                steps_taken[i] = step
            if bool((converged | newly_done).all()) or step == steps - 1:
                break
            loss = (req_nll + kl_factor * req_kl + req_wd
                    + true_factor * req_true)[~(converged | newly_done)].sum()
            converged |= newly_done
            loss.backward()
            if step_rule == "sphere":
                with torch.no_grad():
                    for delta, max_norm in zip(deltas, max_norms):
                        _sphere_step(delta, max_norm, ~converged, sphere_step)
                if bool(newly_done.any()):
                    act = open_rows(~converged)
                continue
            before = [d.detach().clone() for d in deltas]
            optimiser.step()
            with torch.no_grad():
                for delta, old, max_norm in zip(deltas, before, max_norms):
                    delta[converged] = old[converged]  # Adam momentum must not move a converged request
                    norms = delta.norm(dim=1, keepdim=True)
                    delta.mul_(torch.where(norms > max_norm, max_norm / norms, torch.ones_like(norms)))
            if bool(newly_done.any()):
                act = open_rows(~converged)
    log.debug("target values at layer %d (%s): nll %s", layer, sites, last_nll.tolist())
    return {site: TargetValues(layer=layer, site=site, delta=d.detach().to(torch.float64).cpu(),
                               init=i.to(torch.float64).cpu(), final_nll=last_nll.tolist(),
                               steps=list(steps_taken))
            for site, d, i in zip(sites, deltas, inits)}
