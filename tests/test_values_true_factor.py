"""The target-value option `true_factor`: an unlikelihood term on target_true's first token.

Off (0) it must leave the optimisation bit-equal; on, the value found must give the old
answer less probability on the edit prompt than the value found without it. A random tiny
model gives every token ~1/vocab and hardly responds to the value (-log(1 - p) ~ p: no
gradient to see), so the effect is checked on the built-in model.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from factedit import EditRequest
from factedit.linalg.values import optimise_target_values, site_module_name
from factedit.models import TraceDict
from factedit.text import continuation_ids, subject_last_index

SITE = "mlp_out"
REQUEST = EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux",
                      target_new="English", target_true="French")
# Every step taken (no early stop), no KL term: the runs differ only by the new term.
OPTIONS = dict(steps=8, lr=0.5, kl_factor=0.0, early_stop_nll=0.0)


def next_token_probs(model, layer: int, request, delta: torch.Tensor) -> torch.Tensor:
    """p(next token | edit prompt) with `delta` added to the site's output at the subject."""
    ids, idx = subject_last_index(model.tokenizer, request.prompt, request.subject)

    def add(output, name):
        output = output.clone()
        output[0, idx] += delta.to(output.dtype)
        return output

    with torch.no_grad(), TraceDict(model.model, [site_module_name(model, layer, SITE)],
                                    edit_output=add):
        logits = model.model(input_ids=torch.tensor([ids])).logits[0, -1]
    return torch.softmax(logits.double(), dim=-1)


def test_true_factor_zero_or_no_target_true_is_the_default_optimisation(tokenizer):
    model = make_tiny_model(tokenizer, seed=0)
    default = optimise_target_values(model, [REQUEST], 1, SITE, ["{}"], **OPTIONS)
    zero = optimise_target_values(model, [REQUEST], 1, SITE, ["{}"], true_factor=0.0,
                                  **OPTIONS)
    assert torch.equal(default.delta, zero.delta)
    bare = EditRequest(prompt=REQUEST.prompt, subject=REQUEST.subject,
                       target_new=REQUEST.target_new)
    without = optimise_target_values(model, [bare], 1, SITE, ["{}"], **OPTIONS)
    with_factor = optimise_target_values(model, [bare], 1, SITE, ["{}"], true_factor=5.0,
                                         **OPTIONS)
    assert torch.equal(without.delta, with_factor.delta)


@pytest.mark.slow
def test_true_factor_pushes_the_old_answer_down(builtin_model):
    model, layer = builtin_model, 6
    tok = model.tokenizer
    old = continuation_ids(tok, REQUEST.rewrite_prompt, REQUEST.target_true)[0]
    new = continuation_ids(tok, REQUEST.rewrite_prompt, REQUEST.target_new)[0]
    assert old != new
    default = optimise_target_values(model, [REQUEST], layer, SITE, ["{}"], **OPTIONS)
    pushed = optimise_target_values(model, [REQUEST], layer, SITE, ["{}"], true_factor=2.0,
                                    **OPTIONS)
    p_default = next_token_probs(model, layer, REQUEST, default.delta[0])
    p_pushed = next_token_probs(model, layer, REQUEST, pushed.delta[0])
    assert p_pushed[old] < 0.8 * p_default[old], (float(p_pushed[old]), float(p_default[old]))
    assert p_pushed[new] > p_pushed[old]  # the edit itself still lands
