"""GRACE on tiny random models: the codebook edits, defers elsewhere, removes and resumes exactly."""

from __future__ import annotations

import pytest
import torch
from common import EIFFEL, LOUVRE, greedy_first, logits, nll, reference_greedy
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


def test_followed_rows_generation_keeps_the_cache_and_equals_whole_rows(tokenizer):
    """GRACE's from_key replacement needs a row's earlier positions only through the entry
    that matched there: factedit's generation keeps its KV cache (one position per step)
    with that entry kept per row, and writes what re-running whole rows writes, also as
    rows leave the batch at a stop string at different steps."""
    from factedit.metrics.generation import cut_at_stop, generate_continuations

    model = make_tiny_model(tokenizer, layers=3, hidden=128)
    edit(model, [EIFFEL], method="grace", progress=False, **SETTINGS)
    prompts = [EIFFEL.rewrite_prompt, FAR, LOUVRE.rewrite_prompt, "Rome is the capital of"]

    reference = {p: reference_greedy(model, p, 8) for p in prompts}  # whole rows, no cache
    target = continuation_ids(tokenizer, EIFFEL.rewrite_prompt, EIFFEL.target_new)
    assert reference[EIFFEL.rewrite_prompt][0] == target[0]  # the edit acts in the text
    # stop at the third token of the edited row: rows leave the batch at different steps
    stop = (tokenizer.decode([reference[EIFFEL.rewrite_prompt][2]]).strip() or "\n",)
    shapes = []
    module = model.module(model.arch.mlp_out_at(1))
    spy = module.register_forward_hook(lambda _m, args, _out: shapes.append(args[0].shape[:2]))
    try:
        got = generate_continuations(model, prompts, max_new_tokens=8, stop=stop,
                                     batch_size=4, progress=False)
    finally:
        spy.remove()
    assert all(width == 1 for _, width in shapes[1:])  # cached: one new position a step
    assert len({rows for rows, _ in shapes}) > 1  # and rows left the batch on the way
    for prompt in prompts:
        tokens = reference[prompt]
        ends = [i for i, t in enumerate(tokens) if any(s in tokenizer.decode([t]) for s in stop)]
        tokens = tokens[:ends[0] + 1] if ends else tokens
        assert got[prompt] == cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True),
                                          stop), prompt
    assert model.model.generation_config.use_cache is False  # generate still re-runs rows


def test_followed_rows_step_equals_the_whole_row_forward(tokenizer):
    """One cached step of a followed row gives the logits of the whole row run again: the
    entry matched in the prompt replaces the new position's output too."""
    from factedit.models.attach import followed_rows

    model = make_tiny_model(tokenizer, layers=3, hidden=128)
    edit(model, [EIFFEL], method="grace", progress=False, **SETTINGS)
    ids = encode(tokenizer, EIFFEL.rewrite_prompt)
    following = continuation_ids(tokenizer, EIFFEL.rewrite_prompt, "Rome, the city of")
    assert len(following) >= 3
    with torch.no_grad():
        whole = model.model(input_ids=torch.tensor([ids + following])).logits[0, len(ids):]
        with followed_rows(model.model) as select:
            assert select is not None
            first = model.model(input_ids=torch.tensor([ids]), use_cache=True)
            cache, steps = first.past_key_values, []
            for token in following:
                out = model.model(input_ids=torch.tensor([[token]]), past_key_values=cache,
                                  use_cache=True)
                cache = out.past_key_values
                steps.append(out.logits[0, -1])
        unedited_rows = model.model(input_ids=torch.tensor([ids + following]), use_cache=False)
    assert torch.allclose(torch.stack(steps), whole, atol=1e-9)
    assert torch.equal(unedited_rows.logits[0, len(ids):], whole)  # no session: whole rows
