"""T-Patcher and CaliNET on tiny random models: added neurons write the edit, stay silent
where they must, keep generate's KV cache, remove exactly and save/resume exactly."""

from __future__ import annotations

import pytest
import torch
from common import EIFFEL, LOUVRE, greedy_first, logits, nll
from conftest import make_tiny_model

from factedit.methods import CaliNetConfig, ConfigError, TPatcherConfig
from factedit.methods.patches import MEMORY_PROMPTS
from factedit.models import LayerIndexError
from factedit.protocol import EditHandle, edit, make_editor
from factedit.text import continuation_ids, encode

# The tiny model never reaches early_stop_nll (its NLL floor is ln V less ~0.02 * hidden),
# so every edit runs all its steps: few for CaliNET (two layers, eight slots), more for
# T-Patcher's hinges.
SETTINGS = {"t-patcher": dict(steps=150, lr=0.1), "calinet": dict(steps=60, lr=0.1)}


@pytest.mark.parametrize("method", ["t-patcher", "calinet"])
def test_edit_writes_the_target_through_generate(tokenizer, method):
    model = make_tiny_model(tokenizer, layers=3, hidden=128)
    before = nll(model, EIFFEL)
    handle = edit(model, [EIFFEL], method=method, progress=False, **SETTINGS[method])
    # A random model with tied embeddings moves a logit by at most ~0.02 * hidden (128 here):
    # a drop of > 1 nat and the greedy token are what it can show.
    assert nll(model, EIFFEL) < before - 1.0 and greedy_first(model, EIFFEL)
    assert not any(p.grad is not None for p in model.model.parameters())
    prompt_ids = torch.tensor([encode(tokenizer, EIFFEL.rewrite_prompt)])
    out = model.generate(prompt_ids, max_new_tokens=2, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    target = continuation_ids(tokenizer, EIFFEL.rewrite_prompt, EIFFEL.target_new)
    assert out[0, prompt_ids.shape[1]].item() == target[0]
    assert model.model.generation_config.use_cache is True  # position-wise: cache kept
    handle.restore()
    assert nll(model, EIFFEL) == before


def test_t_patcher_neuron_is_silent_on_memory_text(tokenizer):
    model = make_tiny_model(tokenizer, layers=3)
    memory_before = logits(model, MEMORY_PROMPTS[0])
    handle = edit(model, [EIFFEL], method="t-patcher", progress=False, **SETTINGS["t-patcher"])
    info = handle.records[0].info
    assert info["extra_losses"] == {"activation": 0.0, "memory": 0.0}, info
    assert handle.editor.neurons[0].keys.shape == (1, 64)  # one neuron, in the last layer
    assert handle.editor.layers == [2]
    # The hinge holds on every memory position: relu is exactly zero, the logits are equal.
    assert torch.equal(logits(model, MEMORY_PROMPTS[0]), memory_before)


def test_t_patcher_later_edit_is_trained_silent_on_earlier_edits(tokenizer):
    """The first edit's text (prompt + new target, neighbours) is banked; the second edit's
    neuron is held at least `margin` below zero on every banked position, so the first
    edit's logits are untouched. (On zsRE without the bank, later patches fired on earlier
    questions and overwrote them: bench/RESULTS.md.)"""
    model = make_tiny_model(tokenizer, layers=3)
    earlier = f"{EIFFEL.rewrite_prompt} {EIFFEL.target_new}"
    handle = edit(model, [EIFFEL], method="t-patcher", progress=False, **SETTINGS["t-patcher"])
    after_first = logits(model, earlier)
    handle.step([LOUVRE])
    editor = handle.editor
    layer = editor.layers[0]
    banked = editor.memory_bank[0][layer]
    n_prompt = len(encode(tokenizer, earlier))
    assert banked.shape[0] == n_prompt + sum(len(encode(tokenizer, f"{p} {a}"))
                                             for p, a in EIFFEL.neighborhood)
    second = editor.neurons[1]
    z = banked @ second.keys.T.to(banked.dtype) + second.bias.to(banked.dtype)
    assert float(z.max()) <= -editor.config.margin + 1e-9
    assert torch.equal(logits(model, earlier), after_first)
    handle.remove(0)
    assert list(editor.memory_bank) == [1]
    off = edit(make_tiny_model(tokenizer, layers=3), [EIFFEL], method="t-patcher",
               progress=False, memory_history=0, steps=1)
    assert off.editor.memory_bank == {}


@pytest.mark.parametrize("method", ["t-patcher", "calinet"])
def test_remove_and_save_resume_are_exact(tokenizer, tmp_path, method):
    model = make_tiny_model(tokenizer, layers=3)
    unedited = {r.uid: logits(model, r.rewrite_prompt) for r in (EIFFEL, LOUVRE)}
    handle = edit(model, [EIFFEL, LOUVRE], method=method, mode="sequential", progress=False,
                  **SETTINGS[method])
    edited = {r.uid: logits(model, r.rewrite_prompt) for r in (EIFFEL, LOUVRE)}
    handle.save(tmp_path / method)
    handle.remove(0)  # Eiffel's neurons go, Louvre's stay
    assert [n.edit_id for n in handle.editor.neurons] == [1] * len(handle.editor.layers)
    assert not torch.equal(logits(model, LOUVRE.rewrite_prompt), unedited[LOUVRE.uid])
    handle.remove(1)
    for r in (EIFFEL, LOUVRE):
        assert torch.equal(logits(model, r.rewrite_prompt), unedited[r.uid])

    fresh = make_tiny_model(tokenizer, layers=3)
    resumed = EditHandle.resume(fresh, tmp_path / method)
    assert sorted(resumed.editor.memory_bank) == [0, 1]  # later edits still avoid these
    for r in (EIFFEL, LOUVRE):
        assert torch.equal(logits(fresh, r.rewrite_prompt), edited[r.uid])
    resumed.restore()
    assert torch.equal(logits(fresh, EIFFEL.rewrite_prompt), unedited[EIFFEL.uid])


def test_calinet_adds_slots_per_edit_and_layer(tokenizer):
    model = make_tiny_model(tokenizer, layers=3)
    handle = edit(model, [EIFFEL, LOUVRE], method="calinet", mode="sequential", slots=4,
                  progress=False, **SETTINGS["calinet"])
    assert handle.editor.layers == [1, 2]
    assert [(n.edit_id, n.layer, n.keys.shape[0]) for n in handle.editor.neurons] == [
        (0, 1, 4), (0, 2, 4), (1, 1, 4), (1, 2, 4)]


@pytest.mark.parametrize("init", ["separating", "random"])
def test_calinet_starting_slots(tokenizer, init):
    """The separating start: every slot fires on every edit position, at least 0.5 above its
    threshold (a slot silent there gets no gradient), and the memory projects mostly below.
    A random start fires on about half of everything."""
    model = make_tiny_model(tokenizer, layers=3)
    editor = make_editor(model, "calinet", init=init, slots=8)
    gen = torch.Generator().manual_seed(0)
    direction = torch.randn(64, generator=gen)
    edit_queries = {layer: torch.randn(3, 64, generator=gen) + 3 * direction
                    for layer in editor.layers}
    memory_queries = {layer: torch.randn(200, 64, generator=gen) for layer in editor.layers}
    start = editor.init_neurons(edit_queries, memory_queries)
    for layer, (keys, bias, values) in start.items():
        z_edit = edit_queries[layer] @ keys.T + bias
        z_memory = memory_queries[layer] @ keys.T + bias
        assert keys.shape == (8, 64) and not values.any()
        if init == "separating":
            assert float(z_edit.min()) >= 0.5 - 1e-5
            assert float((z_memory > 0).float().mean()) < 0.05
        else:
            assert 0.2 < float((z_memory > 0).float().mean()) < 0.8


@pytest.mark.parametrize("method", ["t-patcher", "calinet"])
def test_memory_terms_on_firing_rows_equal_the_dense_terms(tokenizer, method):
    """The memory terms are computed on the memory rows where a neuron fires (above -margin
    for T-Patcher's hinge); value and gradients equal the terms over every row."""
    editor = make_editor(make_tiny_model(tokenizer, layers=3), method)
    gen = torch.Generator().manual_seed(1)
    layer = editor.layers[-1]
    n = 1 if method == "t-patcher" else editor.config.slots
    keys = (torch.randn(n, 64, generator=gen, dtype=torch.float64) * 0.3).requires_grad_(True)
    bias = torch.full((n,), -2.0, dtype=torch.float64).requires_grad_(True)
    values = torch.randn(n, 64, generator=gen, dtype=torch.float64).requires_grad_(True)
    memory = {layer: torch.randn(500, 64, generator=gen, dtype=torch.float64)}
    edit_queries = {layer: torch.randn(2, 64, generator=gen, dtype=torch.float64)}
    params = {layer: (keys, bias, values)}
    got = sum(editor.extra_losses(params, edit_queries, memory).values())
    grads = torch.autograd.grad(got, (keys, bias, values), allow_unused=True)
    z = memory[layer] @ keys.T + bias
    if method == "t-patcher":
        c = editor.config
        dense = (c.activation_weight * torch.relu(c.margin - (edit_queries[layer] @ keys.T + bias)).mean()
                 + c.memory_weight * torch.relu(z + c.margin).mean())
        assert 0 < int((z > -c.margin).sum()) < 500  # some rows fire, some do not
    else:
        dense = editor.config.memory_weight * (torch.relu(z) @ values).pow(2).sum(-1).mean()
        assert 0 < int((z > 0).any(1).sum()) < 500
    expected = torch.autograd.grad(dense, (keys, bias, values), allow_unused=True)
    assert float(got.detach()) == pytest.approx(float(dense.detach()), rel=1e-12)
    for g, e in zip(grads, expected):
        if e is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["t-patcher", "calinet"])
def test_neurons_cached_in_inference_mode_serve_the_next_edit(tokenizer, method):
    """Scoring under inference_mode between two sequential edits caches the live neurons;
    the second edit's training forward (CaliNET: the upper layer's input depends on the
    lower layer's new slots) must still record gradients through them."""
    model = make_tiny_model(tokenizer, layers=3)
    handle = edit(model, [EIFFEL], method=method, progress=False, **SETTINGS[method])
    with torch.inference_mode():
        logits(model, LOUVRE.rewrite_prompt)  # builds the live-neuron cache
    before = nll(model, LOUVRE)
    handle.step([LOUVRE])  # raised "Inference tensors cannot be saved for backward"
    assert nll(model, LOUVRE) < before - 0.3


@pytest.mark.parametrize(("config", "field", "value"), [
    (TPatcherConfig, "margin", 0), (TPatcherConfig, "steps", 0), (TPatcherConfig, "lr", -1.0),
    (CaliNetConfig, "slots", 0), (CaliNetConfig, "memory_weight", -1.0),
    (CaliNetConfig, "layers", [-1]), (CaliNetConfig, "init", "zeros")])
def test_bad_config_names_the_field(config, field, value):
    with pytest.raises(ConfigError, match=field):
        config(**{field: value})


def test_missing_layer_is_named(tokenizer):
    with pytest.raises(LayerIndexError, match="TPatcherConfig.layers"):
        make_editor(make_tiny_model(tokenizer, layers=2), "t-patcher", layers=[7])
