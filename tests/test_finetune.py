"""FT-L and FT-M on tiny random models: the loss falls, constraints hold, configs fail clearly."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from factedit import EditRequest
from factedit.methods import ConfigError, FtMConfig
from factedit.metrics.scoring import score_pairs
from factedit.models import LayerIndexError
from factedit.protocol import edit, make_editor

REQUEST = EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower",
                      target_new="Rome", target_true="Paris")


def target_nll(model) -> float:
    pair = (REQUEST.rewrite_prompt, REQUEST.target_new)
    score = score_pairs(model, [pair])[pair]
    return -score.logprob / score.n_tokens


@pytest.mark.parametrize("method", ["ft-l", "ft-m"])
def test_finetuning_lowers_the_target_nll_and_leaves_other_weights(tokenizer, method):
    # 128 wide: a random tied-embedding model moves a logit by at most ~0.02 * hidden
    model = make_tiny_model(tokenizer, layers=3, hidden=128)
    before_params = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    before = target_nll(model)
    radius = 0.05 if method == "ft-l" else None
    handle = edit(model, [REQUEST], method=method, layers=[1], lr=1e-2, steps=20,
                  norm_constraint=radius, progress=False)
    after = target_nll(model)
    assert after < before - 1.0, (before, after)
    changed = [n for n, p in model.model.named_parameters() if not torch.equal(p, before_params[n])]
    assert changed == ["model.layers.1.mlp.down_proj.weight"]
    delta = (model.weight(1) - handle.originals[changed[0]]).abs().max()
    if radius is not None:  # the L-infinity ball around W_0
        assert delta <= radius * (1 + 1e-6)
        assert delta >= radius * 0.5, "the constraint should bind at this learning rate"
    else:
        assert delta > 0.05


def test_compute_leaves_the_model_and_grad_flags_as_found(tokenizer):
    model = make_tiny_model(tokenizer, layers=2)
    flags = {n: p.requires_grad for n, p in model.model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    result = make_editor(model, "ft-m", layers=[0], steps=3).compute([REQUEST])
    assert set(result.deltas) == {"model.layers.0.mlp.down_proj.weight"}
    for n, p in model.model.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad == flags[n], n


def test_gpt2_deltas_keep_the_conv1d_orientation(tokenizer):
    model = make_tiny_model(tokenizer, model_type="gpt2", layers=2)
    result = make_editor(model, "ft-m", layers=[1], steps=2).compute([REQUEST])
    (name, delta), = result.deltas.items()
    assert delta.shape == model.model.get_parameter(name).shape


@pytest.mark.parametrize(("field", "value"), [("objective", "last"), ("lr", 0),
                                              ("norm_constraint", -1.0), ("layers", [])])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        FtMConfig(**{field: value})


def test_missing_layer_is_named(tokenizer):
    with pytest.raises(LayerIndexError, match="layers"):
        make_editor(make_tiny_model(tokenizer, layers=2), "ft-l", layers=[5])


@pytest.mark.parametrize("objective", ["prompt_last", "target", "all"])
def test_loss_tokens_are_the_objectives_terms(tokenizer, objective):
    """The vectorised (row, position, token) triples equal the objective written per pair."""
    from factedit.models.scoring import token_rows
    from factedit.text import teacher_forced

    model = make_tiny_model(tokenizer)
    pairs = [("The Eiffel Tower is in", "Rome"), ("Serena Williams plays", "ice hockey"),
             ("The mother tongue of Vladimir Putin is", "French")]
    editor = make_editor(model, "ft-m", objective=objective)
    row, pos, tok = editor._loss_tokens(token_rows(model, pairs))
    expected = []
    for r, (prompt, answer) in enumerate(pairs):
        ids, first, target = teacher_forced(tokenizer, prompt, answer)
        if objective == "prompt_last":
            expected += [(r, first, t) for t in target]
        elif objective == "target":
            expected += [(r, first + j, t) for j, t in enumerate(target)]
        else:
            expected += [(r, p, t) for p, t in enumerate(ids[1:] + [target[-1]])]
    assert list(zip(row.tolist(), pos.tolist(), tok.tolist())) == expected
