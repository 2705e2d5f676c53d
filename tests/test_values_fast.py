"""Cheaper target values: the prefix cache and the step rules of linalg.values.

`prefix_cache=True` runs each step from the subject's last token on against the earlier
positions' keys and values: the optimisation must be the same one (float64 tiny models, every
step taken). The "sphere" rule's closed-form first step must lower the target NLL and land on
the clamp sphere.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model

from factedit import EditRequest
from factedit.linalg.values import (
    FAST_LR,
    FAST_MAX_STEPS,
    optimise_target_values,
    value_rule_options,
)

REQUESTS = [
    EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux",
                target_new="English", target_true="French"),
    EditRequest(prompt="{} plays the", subject="Ludwig van Beethoven", target_new="guitar"),
    EditRequest(prompt="{}, the capital of", subject="Paris", target_new="Italy"),
]
TEMPLATES = ["{}", "A short prefix here. {}", "Another one. {}"]
OPTIONS = dict(steps=6, lr=0.5, clamp_factor=4.0, early_stop_nll=0.0)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma3"])
def test_prefix_cache_gives_the_same_values(tokenizer, model_type):
    model = make_tiny_model(tokenizer, model_type=model_type, seed=1)
    plain = optimise_target_values(model, REQUESTS, 1, "residual", TEMPLATES,
                                   prefix_cache=False, **OPTIONS)
    cached = optimise_target_values(model, REQUESTS, 1, "residual", TEMPLATES,
                                    prefix_cache=True, **OPTIONS)
    assert torch.allclose(plain.delta, cached.delta, atol=1e-9, rtol=1e-9)
    assert plain.final_nll == pytest.approx(cached.final_nll, abs=1e-9)
    assert torch.equal(plain.init, cached.init)


def test_sphere_closed_form_step_lowers_the_target_nll(tokenizer):
    # steps=1 only evaluates delta = 0; steps=2 takes the closed-form step onto the sphere
    # ||delta|| = clamp_factor ||h|| along -grad and evaluates there. A small radius keeps
    # the step in the first-order regime, where -grad must lower the NLL.
    model = make_tiny_model(tokenizer, seed=2)
    options = dict(clamp_factor=0.05, kl_factor=0.0, weight_decay=0.0, early_stop_nll=0.0)
    start = optimise_target_values(model, REQUESTS, 1, "residual", TEMPLATES, steps=1,
                                   step_rule="sphere", **options)
    jumped = optimise_target_values(model, REQUESTS, 1, "residual", TEMPLATES, steps=2,
                                    step_rule="sphere", **options)
    assert torch.count_nonzero(start.delta) == 0
    norms = jumped.delta.norm(dim=1) / jumped.init.norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, 0.05), atol=1e-9)
    for before, after in zip(start.final_nll, jumped.final_nll):
        assert after < before


def test_fast_value_rule_options_and_config_round_trip(tmp_path):
    from factedit.methods.base import ConfigError
    from factedit.methods.locate.d4s_alphaedit import D4SAlphaEditConfig

    options = dict(steps=25, lr=0.5, weight_decay=0.5, clamp_factor=0.75, kl_factor=0.0625,
                   early_stop_nll=0.05)
    assert value_rule_options("adam", options) == options  # cache keys of before kept
    fast = value_rule_options("fast", options)
    assert fast == {**options, "lr": FAST_LR, "steps": FAST_MAX_STEPS, "prefix_cache": True}
    assert value_rule_options("fast", {**options, "steps": 3})["steps"] == 3
    config = D4SAlphaEditConfig(value_rule="fast")
    config.save(tmp_path / "config.json")
    again = D4SAlphaEditConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))
    assert again.value_rule == "fast" and again == config
    with pytest.raises(ConfigError, match="value_rule"):
        D4SAlphaEditConfig(value_rule="quick")


def test_fast_rule_moves_further_in_its_steps_than_the_default_lr(tokenizer):
    # The editor's value options under value_rule="fast" (through the prefix cache) lower
    # every request's target NLL, and further in FAST_MAX_STEPS steps than Adam at the
    # default lr in as many steps (a random tiny model responds weakly to the value, so
    # the test compares rather than asking for a low NLL).
    model = make_tiny_model(tokenizer, seed=3)
    adam = dict(steps=FAST_MAX_STEPS, lr=0.5, weight_decay=0.5, clamp_factor=4.0,
                kl_factor=0.0625, early_stop_nll=0.05)
    fast = value_rule_options("fast", adam)
    start = optimise_target_values(model, REQUESTS, 1, "residual", TEMPLATES,
                                   **{**fast, "steps": 1})
    slow = optimise_target_values(model, REQUESTS, 1, "residual", TEMPLATES, **adam)
    values = optimise_target_values(model, REQUESTS, 1, "residual", TEMPLATES, **fast)
    assert max(values.steps) <= FAST_MAX_STEPS
    assert all(a < b for a, b in zip(values.final_nll, start.final_nll))
    assert sum(values.final_nll) < sum(slow.final_nll)


def test_value_batches_group_requests_by_row_length_and_values_stay_per_request(tokenizer):
    """Batches follow the rows' length from the subject on (less padding per step), cover
    every request once, and a request's value does not depend on the batch it sits in."""
    from factedit.linalg.values import value_batches
    from factedit.text import continuation_ids, subject_last_index

    model = make_tiny_model(tokenizer, seed=1)
    requests = REQUESTS + [EditRequest(prompt="{} is", subject="Rome", target_new="a city in Peru")]
    batches = value_batches(model, requests, 2)
    assert sorted(i for b in batches for i in b) == list(range(len(requests)))
    assert [len(b) for b in batches] == [2, 2]

    def suffix(i: int) -> int:
        ids, s = subject_last_index(model.tokenizer, requests[i].prompt, requests[i].subject)
        return len(ids) - s + len(continuation_ids(model.tokenizer, requests[i].rewrite_prompt,
                                                   requests[i].target_new))
    order = [i for b in batches for i in b]
    assert [suffix(i) for i in order] == sorted(suffix(i) for i in range(len(requests)))
    assert order != list(range(len(requests))), "the fixture must need reordering"
    with pytest.raises(ValueError, match="batch size"):
        value_batches(model, requests, 0)
    together = optimise_target_values(model, requests, 1, "residual", TEMPLATES, **OPTIONS)
    for batch in batches:
        apart = optimise_target_values(model, [requests[i] for i in batch], 1, "residual",
                                       TEMPLATES, **OPTIONS)
        torch.testing.assert_close(apart.delta, together.delta[batch], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_kl_rows_apart_give_the_same_values(tokenizer, prefix_cache):
    """The KL rows run as their own forward cut after the subject token: the same
    optimisation (float64 tiny Llama, every step taken, with and without the prefix
    cache), to the rounding of the float32 deltas (the gradients sum in another order)."""
    model = make_tiny_model(tokenizer, seed=2)
    together = optimise_target_values(model, REQUESTS, 1, "residual", TEMPLATES,
                                      prefix_cache=prefix_cache, kl_apart_from=10**9,
                                      **OPTIONS)
    apart = optimise_target_values(model, REQUESTS, 1, "residual", TEMPLATES,
                                   prefix_cache=prefix_cache, kl_apart_from=0, **OPTIONS)
    assert together.steps == apart.steps == [OPTIONS["steps"]] * len(REQUESTS)
    torch.testing.assert_close(apart.delta, together.delta, rtol=1e-5, atol=1e-6)
    assert apart.final_nll == pytest.approx(together.final_nll, rel=1e-6)
    assert apart.delta.abs().max() > 1e-2
