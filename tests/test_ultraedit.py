"""UltraEdit: the closed-form step on a tiny float64 model (keys and output gradients are the
weight gradient's factors, the solve is the ridge least-squares one, the running statistics
equal all rows at once), no optimisation loop (one forward and one backward pass per edit,
whatever the settings), save/resume and restore, and a real flip on the built-in model."""

from __future__ import annotations

import pytest
import torch
from common import HYPERNET_REQUESTS
from conftest import make_tiny_model, tiny_tokenizer

import factedit as fe
from factedit.linalg.moments import RunningMoments
from factedit.methods import ConfigError, get_method
from factedit.methods.ultraedit import UltraEditConfig
from factedit.protocol import make_editor
from factedit.text import teacher_forced

R0, R1, R2 = HYPERNET_REQUESTS[:3]
LAYERS = [0, 1]


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_model(tiny_tokenizer(), layers=2)


def weights(model, layers=LAYERS):
    return {layer: model.mlp_out(layer).weight.detach().clone() for layer in layers}


def test_registered_with_batch_and_config_errors():
    spec = get_method("ultraedit")
    assert spec.supports_batch and not spec.supports_remove
    for bad, field in ((dict(lr=0.0), "lr"), (dict(ridge=-1.0), "ridge"),
                       (dict(token="subject"), "token"), (dict(layers=[2, 1]), "layers"),
                       (dict(projections="gate"), "projections")):
        with pytest.raises(ConfigError, match=field):
            UltraEditConfig(**bad)


@pytest.mark.parametrize("projections", ["out", "in"])
def test_keys_and_gradients_factor_the_weight_gradient(tiny, projections):
    """sum_t g_t k_t^T over every position is dLoss/dW of each edited projection
    (token='all'): the output projections, or the gate and up projections ("in")."""
    editor = make_editor(tiny, "ultraedit", layers=LAYERS, projections=projections)
    assert len(editor.sites) == len(LAYERS) * (1 if projections == "out" else 2)
    reads, nll = editor.key_gradients([R0])
    ids, first, answer = teacher_forced(tiny.tokenizer, R0.rewrite_prompt, R0.target_new)
    params = [tiny.module(name).weight for name in editor.sites.values()]
    for p in params:
        p.requires_grad_(True)
    try:
        logits = tiny.model(input_ids=torch.tensor([ids])).logits[0]
        positions = torch.arange(first, first + len(answer))
        loss = torch.nn.functional.cross_entropy(logits[positions], torch.tensor(answer))
        grads = torch.autograd.grad(loss, params)
    finally:
        for p in params:
            p.requires_grad_(False)
    assert nll == pytest.approx(float(loss.detach()), rel=1e-12)
    for site, grad in zip(editor.sites, grads):
        K, G = reads[site]
        assert K.shape[0] == len(ids)
        torch.testing.assert_close(G.T @ K, grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("projections", ["out", "in"])
def test_delta_is_the_ridge_least_squares_solution(tiny, projections):
    """Delta = argmin ||Delta K - V||^2 + ridge ||Delta||^2, V = -lr ||k^||^2 g^, with k^, g^
    the z-scores under the statistics that include this edit's rows."""
    config = UltraEditConfig(layers=LAYERS, lr=1e-2, ridge=0.5, projections=projections)
    editor = make_editor(tiny, config)
    editor.compute([R0])  # a first edit, so the second is normalised by a running statistic
    reads, _ = editor.key_gradients([R1, R2])  # a batch: two rows of different lengths
    state = {site: RunningMoments.load(editor.moments[site].state()) for site in editor.sites}
    result = editor.compute([R1, R2])
    assert set(result.deltas) == {f"{name}.weight" for name in editor.sites.values()}
    for site, name in editor.sites.items():
        K, G = reads[site]
        rows = torch.cat([K, G], 1)
        state[site].update(rows)
        everything = state[site]
        z = (rows - everything.mean) / (everything.std() + 1e-8)
        k_hat, g_hat = z[:, :K.shape[1]], z[:, K.shape[1]:]
        V = -1e-2 * (k_hat ** 2).sum(1, keepdim=True) * g_hat
        # The normal equations, solved directly (a different route from the editor's Woodbury).
        A = K.T @ K + 0.5 * torch.eye(K.shape[1], dtype=torch.float64)
        expected = torch.linalg.solve(A, K.T @ V).T
        delta = result.deltas[f"{name}.weight"]
        torch.testing.assert_close(delta, expected, rtol=1e-9, atol=1e-12)
        assert editor.moments[site].count == everything.count


def test_running_moments_equal_all_rows_at_once():
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(37, 5, dtype=torch.float64, generator=gen) * 3 + 1
    moments = RunningMoments(5)
    for start, stop in ((0, 1), (1, 9), (9, 10), (10, 37)):
        moments.update(rows[start:stop])
    torch.testing.assert_close(moments.mean, rows.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(moments.std(), rows.std(0), rtol=1e-12, atol=1e-12)
    assert moments.count == 37


def test_no_optimisation_loop_one_backward_per_edit(tiny, monkeypatch):
    """An edit is one forward and one backward pass, whatever lr, ridge or batch size, and no
    optimiser is ever built."""
    def no_optimiser(*_args, **_kwargs):
        raise AssertionError("UltraEdit must not build an optimiser")

    monkeypatch.setattr(torch.optim.Adam, "__init__", no_optimiser)
    monkeypatch.setattr(torch.optim.SGD, "__init__", no_optimiser)
    calls = {"backward": 0, "forward": 0}
    real_grad = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        calls["backward"] += 1
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    hook = tiny.model.get_input_embeddings().register_forward_hook(
        lambda *_: calls.__setitem__("forward", calls["forward"] + 1))
    try:
        for lr, ridge, batch in ((1e-4, 1.0, [R0]), (1.0, 1e-3, [R0, R1, R2])):
            before = dict(calls)
            editor = make_editor(tiny, "ultraedit", layers=LAYERS, lr=lr, ridge=ridge)
            result = editor.compute(batch)
            assert calls["backward"] - before["backward"] == 1
            assert calls["forward"] - before["forward"] == 1
            assert result.info["backward_passes"] == 1
    finally:
        hook.remove()


def test_sequential_save_resume_and_restore(tiny, tmp_path):
    """Two sequential edits, the statistics saved and loaded into a fresh editor: the third
    edit is the same to the bit; restore gives the original weights exactly."""
    original = weights(tiny)
    handle = fe.edit(tiny, [R0, R1], "ultraedit", mode="sequential", layers=LAYERS, lr=1e-2,
                     progress=False)
    assert any(not torch.equal(original[layer], w) for layer, w in weights(tiny).items())
    tensors, manifest = handle.editor.state_dict()
    resumed = make_editor(tiny, "ultraedit", layers=LAYERS, lr=1e-2)
    resumed.load_state_dict(tensors, manifest)
    assert resumed.edits == 2
    a, b = handle.editor.compute([R2]), resumed.compute([R2])
    for name, delta in a.deltas.items():
        assert torch.equal(delta, b.deltas[name])
    wrong = make_editor(tiny, "ultraedit", layers=[1], lr=1e-2)
    with pytest.raises(ValueError, match="layers"):
        wrong.load_state_dict(tensors, manifest)
    other_site = make_editor(tiny, "ultraedit", layers=LAYERS, lr=1e-2, projections="in")
    with pytest.raises(ValueError, match="projections 'in'"):
        other_site.load_state_dict(tensors, manifest)
    handle.restore()
    for layer, w in weights(tiny).items():
        assert torch.equal(original[layer], w)


@pytest.mark.slow
def test_builtin_model_flip(builtin_model):
    """One UltraEdit edit (default config) flips a CounterFact-style greedy answer."""
    model = builtin_model
    request = fe.EditRequest(prompt="{} plays the sport of", subject="Serena Williams",
                             target_new="cricket", target_true="tennis")

    def greedy() -> str:
        ids = model.tokenizer(request.rewrite_prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            return model.tokenizer.decode(model.model(input_ids=ids).logits[0, -1].argmax())

    before = greedy()
    assert before.strip() != "cricket"
    handle = fe.edit(model, request, "ultraedit", progress=False)
    try:
        assert greedy().strip() == "cricket"
    finally:
        handle.restore()
    assert greedy() == before
