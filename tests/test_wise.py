"""WISE: routing keeps unrelated prompts on the main memory (their logits equal the unedited
model's exactly) while edited prompts route to the side memory; weights never change; save
and resume give the same router and outputs; restore is exact; a real flip on the built-in
model; TIES merging and knowledge shards (exact identities on the tiny model); padding does
not count in a route; the KV-cached generation equals re-running whole rows."""

from __future__ import annotations

import pytest
import torch
from common import HYPERNET_REQUESTS, UNRELATED, assert_generation_equals_whole_rows, logits
from conftest import make_tiny_model, tiny_tokenizer

import factedit as fe
from factedit.linalg.merge import ties_merge
from factedit.methods import ConfigError, get_method
from factedit.methods.wise import WiseConfig
from factedit.models.attach import FollowedRows
from factedit.protocol import make_editor

R0, R1 = HYPERNET_REQUESTS[:2]
# A tiny random model's activation scores are a few units: margins on its scale.
TINY = dict(layer=1, steps=30, lr=0.5, alpha=0.2, beta=2.0, gamma=1.0, norm_constraint=1.0,
            mask_ratio=0.5)


def assert_resumed_gives(model, handle, resumed, texts, expected) -> None:
    """With the handle's own hook off and `resumed`'s on, each text gives its expected logits
    bit for bit."""
    with handle.disabled():
        attachment = resumed.attachment()
        attachment.install()
        try:
            for text, out in zip(texts, expected):
                assert torch.equal(logits(model, text), out)
        finally:
            attachment.remove()


@pytest.fixture(scope="module")
def edited():
    """A tiny model, its unedited logits on an unrelated prompt, and two sequential edits."""
    model = make_tiny_model(tiny_tokenizer(), layers=2)
    before = {"unrelated": logits(model, UNRELATED),
              "edit": logits(model, R0.rewrite_prompt),
              "weights": {n: p.detach().clone() for n, p in model.model.named_parameters()}}
    handle = fe.edit(model, [R0, R1], "wise", mode="sequential", progress=False, **TINY)
    return model, handle, before


def test_registered_sequential_only_and_config_errors():
    spec = get_method("wise")
    assert not spec.supports_batch and not spec.supports_remove
    for bad, field in ((dict(mask_ratio=0.0), "mask_ratio"), (dict(steps=0), "steps"),
                       (dict(alpha=-1.0), "alpha"), (dict(layer=-2), "layer"),
                       (dict(shard_size=2, merge_every=3), "merge_every"),
                       (dict(shard_size=0), "shard_size"), (dict(merge_density=0.0),
                                                             "merge_density"),
                       (dict(merged_share=1.5), "merged_share")):
        with pytest.raises(ConfigError, match=field):
            WiseConfig(**bad)


def test_unrelated_prompt_stays_on_main_memory_exactly(edited):
    model, handle, before = edited
    editor = handle.editor
    assert not editor.routes_to_side(UNRELATED)
    assert torch.equal(logits(model, UNRELATED), before["unrelated"])
    # Weights untouched: the edit lives in the side memory only.
    for name, p in model.model.named_parameters():
        assert torch.equal(p, before["weights"][name])


def test_edited_prompt_routes_to_side_memory(edited):
    model, handle, before = edited
    editor = handle.editor
    for request in (R0, R1):
        assert editor.routes_to_side(request.rewrite_prompt)
    after = logits(model, R0.rewrite_prompt)
    assert not torch.equal(after, before["edit"])
    target = model.tokenizer(" " + R0.target_new)["input_ids"][0]
    assert after[0, -1].argmax() == target


def test_later_edits_train_against_the_main_memory():
    """The router stands aside while an edit trains: edits through the protocol (the
    attachment installed after the first; R0 again routes to the side memory) equal the same
    edits computed with no hook at all."""
    model = make_tiny_model(tiny_tokenizer(), layers=2)
    handle = fe.edit(model, [R0, R1, R0], "wise", mode="sequential", progress=False, **TINY)
    with handle.disabled():
        bare = make_editor(model, "wise", **TINY)
        for request in (R0, R1, R0):
            bare.compute([request])
    assert torch.equal(bare.delta, handle.editor.delta)
    assert bare.edit_scores == handle.editor.edit_scores


def test_padding_does_not_count_in_a_rows_route(edited):
    """A row's score leaves out the positions its attention mask drops, so an edited prompt
    right-padded beside a much longer unrelated one (padding would dilute its mean) still
    routes to the side memory and gives its own logits, and the unrelated row stays on the
    main memory."""
    model, _, before = edited
    tok = model.tokenizer
    short = tok(R0.rewrite_prompt)["input_ids"]
    long = tok(UNRELATED + " " + " ".join(["and then the next morning"] * 6))["input_ids"]
    assert len(long) > 3 * len(short)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.tensor([short + [pad] * (len(long) - len(short)), long])
    mask = torch.tensor([[1] * len(short) + [0] * (len(long) - len(short)), [1] * len(long)])
    with torch.no_grad():
        batch = model.model(input_ids=ids, attention_mask=mask).logits
    alone = logits(model, R0.rewrite_prompt)[0]
    assert torch.allclose(batch[0, :len(short)], alone, atol=1e-5)
    assert not torch.allclose(alone, before["edit"][0], atol=1e-3)   # the side memory's
    assert torch.allclose(batch[1], logits(model, torch.tensor([long]))[0], atol=1e-5)


def test_generation_keeps_the_cache_and_equals_whole_rows(edited, monkeypatch):
    """The router decides per row from the mean of all its positions' scores, so factedit's
    generation keeps the KV cache with each row's running sum and runs the whole rows again
    only when a row changes memory on the way: at every threshold it writes what re-running
    whole rows writes, with rows changing memory while they are generated at some."""
    model, handle, _ = edited
    editor = handle.editor
    prompts = [R0.rewrite_prompt, R1.rewrite_prompt, UNRELATED, R0.paraphrases[0]]
    reruns: list[bool] = []
    take_rerun = FollowedRows.take_rerun

    def counted(session: FollowedRows) -> bool:
        reruns.append(take_rerun(session))
        return reruns[-1]

    monkeypatch.setattr(FollowedRows, "take_rerun", counted)
    widths: list[int] = []
    module = model.module(editor.module_name)
    spy = module.register_forward_hook(lambda _m, args, _out: widths.append(args[0].shape[1]))
    changed = cached = 0
    try:
        for threshold in (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, editor.threshold()):
            monkeypatch.setattr(editor, "threshold", lambda t=threshold: t)
            reruns.clear()
            widths.clear()
            assert_generation_equals_whole_rows(model, prompts, 8, threshold)
            changed += any(reruns)
            cached += sum(w == 1 for w in widths[-len(reruns):])
    finally:
        spy.remove()
    assert changed > 0   # some thresholds made a row change memory mid-generation
    assert cached > 0    # and steps ran on the cache
    assert model.model.generation_config.use_cache is False  # `generate` still re-runs rows


def test_save_resume_gives_the_same_router_and_outputs(edited):
    """A fresh editor loading the saved side memory and router gives the same logits."""
    model, handle, _ = edited
    texts = (R0.rewrite_prompt, R1.rewrite_prompt, UNRELATED)
    expected = [logits(model, text) for text in texts]
    tensors, manifest = handle.editor.state_dict()
    resumed = make_editor(model, "wise", **TINY)
    resumed.load_state_dict(tensors, manifest)
    assert resumed.edit_scores == handle.editor.edit_scores
    assert torch.equal(resumed.delta, handle.editor.delta)
    assert_resumed_gives(model, handle, resumed, texts, expected)
    with pytest.raises(ValueError, match="layer"):
        make_editor(model, "wise", **dict(TINY, layer=0)).load_state_dict(tensors, manifest)


def test_restore_is_exact(edited):
    model, handle, before = edited
    edited_logits = logits(model, R0.rewrite_prompt)
    handle.restore()
    assert torch.equal(logits(model, R0.rewrite_prompt), before["edit"])
    assert not torch.equal(edited_logits, before["edit"])


def test_ties_merge_by_hand():
    """Trim to the 2 largest of 4, elect the sign of the sum, mean of the agreeing entries."""
    d1 = torch.tensor([3.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    d2 = torch.tensor([-2.0, -2.0, 1.0, 0.1], dtype=torch.float64)
    merged = ties_merge([d1, d2], [0.5, 0.5], density=0.5)
    assert torch.equal(merged, torch.tensor([3.0, -2.0, 0.0, 2.0], dtype=torch.float64))
    # Unequal weights: a weighted mean over the agreeing entries.
    merged = ties_merge([d1, d2], [0.25, 0.75], density=1.0)
    expected = torch.tensor([-2.0, (-0.25 - 1.5) / 1.0, (0.125 + 0.75) / 1.0,
                             (0.5 + 0.075) / 1.0], dtype=torch.float64)
    assert torch.allclose(merged, expected, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="weight"):
        ties_merge([d1], [0.5, 0.5], density=0.5)


def test_shards_put_aside_then_merged_by_ties():
    """shard_size=2: after 4 edits two shards (fresh zero start each) are put aside; with
    merge_every=4 they are TIES-merged, and the merged memory equals ties_merge of the shards
    the same edits give without merging; the router then chooses among every side memory,
    unrelated prompts stay on the main memory bit for bit, and save/resume keeps it all."""
    requests = [R0, R1, R0, R1, R0]
    model = make_tiny_model(tiny_tokenizer(), layers=2)
    unrelated = logits(model, UNRELATED)
    apart = make_editor(model, "wise", **TINY, shard_size=2, merge_every=None)
    for request in requests[:4]:
        apart.compute([request])
    assert len(apart.shards) == 2 and apart.merged is None and not apart.delta.any()
    assert not torch.equal(apart.shards[0], apart.shards[1])  # shard 1 has its own mask
    handle = fe.edit(model, requests, "wise", mode="sequential", progress=False, **TINY,
                     shard_size=2, merge_every=4, merge_density=0.5)
    editor = handle.editor
    assert editor.edit_count == 5 and editor.shards == []
    expected = ties_merge([s.double() for s in apart.shards], [0.5, 0.5], 0.5)
    assert torch.equal(editor.merged, expected.to(editor.merged.dtype))
    assert len(editor.side_memories()) == 2       # the merged memory and the current shard
    assert torch.equal(logits(model, UNRELATED), unrelated)
    texts = (R0.rewrite_prompt, R1.rewrite_prompt, UNRELATED)
    expected_logits = [logits(model, text) for text in texts]
    tensors, manifest = editor.state_dict()
    resumed = make_editor(model, "wise", **TINY, shard_size=2, merge_every=4,
                          merge_density=0.5)
    resumed.load_state_dict(tensors, manifest)
    assert resumed.edit_count == 5 and torch.equal(resumed.merged, editor.merged)
    assert_resumed_gives(model, handle, resumed, texts, expected_logits)
    handle.restore()


@pytest.mark.slow
def test_builtin_model_flip_and_unrelated_untouched(builtin_model):
    model = builtin_model
    request = fe.EditRequest(prompt="{} plays the sport of", subject="Serena Williams",
                             target_new="cricket", target_true="tennis")
    unrelated = "The capital of France is"
    before = logits(model, unrelated)

    def greedy() -> str:
        return model.tokenizer.decode(logits(model, request.rewrite_prompt)[0, -1].argmax())

    assert greedy().strip() != "cricket"
    handle = fe.edit(model, request, "wise", steps=40, progress=False)
    try:
        assert greedy().strip() == "cricket"
        assert handle.editor.routes_to_side(request.rewrite_prompt)
        assert torch.equal(logits(model, unrelated), before)
    finally:
        handle.restore()
