"""GRACE on tiny random models: the codebook edits, defers elsewhere, removes and resumes exactly."""

from __future__ import annotations

import pytest
import torch
from common import EIFFEL, LOUVRE, greedy_first, logits, nll
from conftest import make_tiny_model

from factedit.methods import ConfigError, GraceConfig
from factedit.methods.grace import Codebook
from factedit.models import LayerIndexError
from factedit.protocol import EditHandle, edit, make_editor
from factedit.text import continuation_ids, encode

FAR = "My favourite breakfast is"
SETTINGS = dict(layer=1, eps=1e-3, steps=40, lr=0.5)


@pytest.mark.parametrize("replacement", ["from_key", "key"])
def test_edit_writes_the_target_and_defers_elsewhere(tokenizer, replacement):
    model = make_tiny_model(tokenizer, layers=3, hidden=128)
    before, far_before = nll(model, EIFFEL), logits(model, FAR)
    handle = edit(model, [EIFFEL], method="grace", replacement=replacement, progress=False,
                  **SETTINGS)
    # A random model with tied embeddings (init std 0.02) moves a logit by at most about
    # 0.02 * hidden, so 128 wide: a drop of > 1 nat and the greedy token are what it can show.
    assert nll(model, EIFFEL) < before - 1.0 and greedy_first(model, EIFFEL)
    assert torch.equal(logits(model, FAR), far_before)  # no key within eps: untouched
    assert not any(p.grad is not None for p in model.model.parameters())
    # generate sees the edit: its first new token is the target's first token
    prompt_ids = torch.tensor([encode(tokenizer, EIFFEL.rewrite_prompt)])
    out = model.generate(prompt_ids, max_new_tokens=2, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    target = continuation_ids(tokenizer, EIFFEL.rewrite_prompt, EIFFEL.target_new)
    assert out[0, prompt_ids.shape[1]].item() == target[0]
    assert model.model.generation_config.use_cache is (replacement == "key")
    handle.restore()
    assert torch.equal(logits(model, FAR), far_before) and nll(model, EIFFEL) == before
    assert model.model.generation_config.use_cache is True


def test_remove_takes_out_exactly_one_entry_and_save_resume_round_trips(tokenizer, tmp_path):
    model = make_tiny_model(tokenizer, layers=3)
    unedited = logits(model, EIFFEL.rewrite_prompt)
    handle = edit(model, [EIFFEL, LOUVRE], method="grace", progress=False, **SETTINGS)
    assert handle.editor.codebook.owners == [0, 1]
    edited = {r.uid: logits(model, r.rewrite_prompt) for r in (EIFFEL, LOUVRE)}
    handle.save(tmp_path / "grace")

    handle.remove(0)
    assert handle.editor.codebook.owners == [1]
    assert torch.equal(logits(model, EIFFEL.rewrite_prompt), unedited)
    assert torch.equal(logits(model, LOUVRE.rewrite_prompt), edited[LOUVRE.uid])

    fresh = make_tiny_model(tokenizer, layers=3)
    resumed = EditHandle.resume(fresh, tmp_path / "grace")
    assert resumed.editor.codebook.owners == [0, 1]
    for r in (EIFFEL, LOUVRE):
        assert torch.equal(logits(fresh, r.rewrite_prompt), edited[r.uid])
    resumed.restore()
    assert torch.equal(logits(fresh, EIFFEL.rewrite_prompt), unedited)


def test_codebook_adds_splits_and_expands():
    book = Codebook()
    k = torch.zeros(4, dtype=torch.float64)
    v = torch.ones(2, dtype=torch.float64)
    far, near = k + 10.0, k + torch.tensor([0.5, 0, 0, 0], dtype=torch.float64)
    assert book.insert(0, k, v, "Rome", eps=1.0) == "add"
    assert book.insert(1, far, v, "Rome", eps=1.0) == "add"
    assert book.insert(2, near, v, "Rome", eps=1.0) == "expand"   # same label: radius grows
    assert book.radii[0] == 1.0  # d = 0.5 is inside already: coverage keeps 1.0
    assert book.insert(3, near * 3, v, "Paris", eps=1.0) == "split"  # conflict at d = 1.5
    assert book.radii[0] == pytest.approx(0.75) and book.radii[-1] == pytest.approx(0.75)
    assert book.owners == [0, 1, 3]


def test_gpt2_codebook_on_conv1d(tokenizer):
    model = make_tiny_model(tokenizer, model_type="gpt2", layers=2)
    before = nll(model, EIFFEL)
    handle = edit(model, [EIFFEL], method="grace", progress=False, **{**SETTINGS, "layer": 0})
    assert nll(model, EIFFEL) < before - 1.0 and greedy_first(model, EIFFEL)
    keys = handle.editor.state_dict()[0]["keys"]
    assert keys.shape == (1, model.model.config.n_inner or 4 * model.model.config.n_embd)


@pytest.mark.parametrize(("field", "value"), [("eps", 0), ("steps", 0), ("lr", -1.0),
                                              ("replacement", "all"), ("layer", -2)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        GraceConfig(**{field: value})


def test_missing_layer_is_named(tokenizer):
    with pytest.raises(LayerIndexError, match="GraceConfig.layer"):
        make_editor(make_tiny_model(tokenizer, layers=2), "grace", layer=7)


def test_grace_refuses_a_batch(tokenizer):
    with pytest.raises(ValueError, match="sequential"):
        edit(make_tiny_model(tokenizer, layers=2), [EIFFEL, LOUVRE], method="grace",
             mode="batch", progress=False)


def test_codebook_cached_in_inference_mode_serves_a_gradient_forward(tokenizer):
    """Evaluating under inference_mode caches the codebook; a later forward that autograd
    records (fine-tuning, attribution, a second method's value optimisation) must still run
    and send a gradient through the replaced activations."""
    model = make_tiny_model(tokenizer, layers=3)
    edit(model, [EIFFEL], method="grace", progress=False, **SETTINGS)
    ids = torch.tensor([encode(tokenizer, EIFFEL.rewrite_prompt)])
    with torch.inference_mode():
        model.model(input_ids=ids)  # builds the codebook tensors
    embeds = model.model.get_input_embeddings()(ids).detach().requires_grad_(True)
    model.model(inputs_embeds=embeds).logits[0, -1].logsumexp(-1).backward()
    assert embeds.grad is not None and torch.isfinite(embeds.grad).all()
