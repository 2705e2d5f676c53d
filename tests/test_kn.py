"""Knowledge Neurons on tiny random models: the attribution is integrated gradients, the
edit writes only the value slots of the neurons found, bad configs fail by name."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from factedit import EditRequest
from factedit.methods import ConfigError, KnConfig
from factedit.protocol import make_editor

REQUEST = EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower",
                      target_new="Rome", target_true="Paris",
                      paraphrases=["Where is The Eiffel Tower? It is in the city of"])

TOKEN = 234  # the answer token whose probability is attributed: any id of the tiny vocabulary


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma3"])
def test_attribution_matches_a_loop_over_interpolation_steps(tokenizer, model_type):
    """The batched Riemann sum, run from each layer on with the answer position alone
    against the cached keys and values of the positions before it, equals m separate
    full-prompt forward/backward passes (float64), for every layer of one call."""
    model = make_tiny_model(tokenizer, model_type, layers=3)
    editor = make_editor(model, "kn", ig_steps=4)
    prompt, token = REQUEST.rewrite_prompt, TOKEN
    shapes = []
    spy = model.layers[2].register_forward_pre_hook(
        lambda mod, args, kwargs: shapes.append(tuple((args or [kwargs["hidden_states"]])[0].shape[:2])),
        with_kwargs=True)
    attributions = editor.attribution(prompt, token, layers=[0, 1, 2])
    spy.remove()
    assert sorted(attributions) == [0, 1, 2]
    # the three batched passes ran the answer position alone (the cache held the rest)
    assert [s for s in shapes if s[0] == 4] == [(4, 1)] * 3
    for layer, batched in attributions.items():
        assert torch.allclose(batched.double(), loop_attribution(model, prompt, token, layer),
                              rtol=1e-4, atol=1e-10)


def test_attribution_of_a_one_token_prompt(tokenizer):
    """No position before the answer: nothing to cache, the pass runs the whole prompt."""
    model = make_tiny_model(tokenizer, layers=2)
    editor = make_editor(model, "kn", ig_steps=3)
    (batched,) = editor.attribution("Paris", TOKEN, layers=[1]).values()
    assert torch.allclose(batched.double(), loop_attribution(model, "Paris", TOKEN, 1, m=3),
                          rtol=1e-4, atol=1e-10)


def loop_attribution(model, prompt: str, token: int, layer: int, m: int = 4) -> torch.Tensor:
    """a * mean_k dP(token | (k/m) a) / da at the last position, one full pass per step."""
    ids = torch.tensor([model.tokenizer(prompt)["input_ids"]])
    down = model.mlp_out(layer)
    captured = {}
    handle = down.register_forward_pre_hook(lambda mod, args: captured.setdefault("a", args[0]))
    with torch.no_grad():
        model.model(input_ids=ids)
    handle.remove()
    a = captured["a"][0, -1].clone()
    total = torch.zeros_like(a)
    for k in range(1, m + 1):
        point = (k / m * a).clone().requires_grad_(True)

        def swap(mod, args, point=point):
            x = args[0].clone()
            x[0, -1] = point
            return (x,)

        h = down.register_forward_pre_hook(swap)
        logits = model.model(input_ids=ids).logits[0, -1]
        h.remove()
        (g,) = torch.autograd.grad(torch.softmax(logits.float(), -1)[token], point)
        total += g
    return (a * total / m).double()


def test_edit_changes_only_the_value_slots_of_found_neurons(tokenizer):
    model = make_tiny_model(tokenizer, layers=3)
    result = make_editor(model, "kn", ig_steps=5, max_neurons=4, share_threshold=0.5
                         ).compute([REQUEST])
    (neurons,) = result.info["neurons"]
    assert 0 < len(neurons) <= 4
    for name, delta in result.deltas.items():
        layer = int(name.split(".")[2])
        touched = torch.nonzero(delta.abs().sum(0)).flatten().tolist()
        assert sorted(touched) == sorted(i for at, i in neurons if at == layer)


def test_edit_raises_the_new_target(tokenizer):
    """After the edit, the new answer's first token gains probability at the prompt."""
    from factedit.protocol import edit

    model = make_tiny_model(tokenizer, layers=3)
    tok = model.tokenizer
    ids = torch.tensor([tok(REQUEST.rewrite_prompt)["input_ids"]])
    new = tok(" Rome", add_special_tokens=False)["input_ids"][0]

    def p_new():
        with torch.no_grad():
            return float(torch.softmax(model.model(input_ids=ids).logits[0, -1], -1)[new])

    before = p_new()
    edit(model, [REQUEST], method="kn", ig_steps=5, update_scale=20.0, progress=False)
    assert p_new() > before


@pytest.mark.parametrize(("field", "value"), [("adaptive_threshold", 0.0),
                                              ("share_threshold", 1.5), ("ig_steps", 0),
                                              ("layers", [])])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        KnConfig(**{field: value})
