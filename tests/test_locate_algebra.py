"""Exact identities of the MEMIT family on tiny random float64 models.

Each test states the identity it checks: D4S's history sums equal MEMIT's batch solution,
AlphaEdit's update is blind to the keys C preserves, D4S removal and resume are exact, ROME's
update is rank one and lands on v*. Configs are small (2 layers, 8 optimisation steps, 2
context prefixes, C from 4,096 wikitext tokens) so the module runs in well under a minute.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SHARED_DATA, make_tiny_model
from safetensors.torch import load_file, save_file

from factedit import EditRequest
from factedit.methods import (
    AlphaEditConfig,
    ConfigError,
    D4SAlphaEditConfig,
    D4SConfig,
    EditResult,
    MemitConfig,
    PmetConfig,
    RomeConfig,
)
from factedit.models import LayerIndexError
from factedit.protocol import EditHandle, edit, make_editor

CORPUS = SHARED_DATA / "corpus" / "wikitext-2-raw"
LAYERS = [1, 2]

FACTS = [
    ("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris"),
    ("{} plays the sport of", "Serena Williams", "cricket", "tennis"),
    ("The mother tongue of {} is", "Vladimir Putin", "French", "Russian"),
    ("{} was developed by", "Windows XP", "Apple", "Microsoft"),
    ("{} is a citizen of", "Angela Merkel", "Canada", "Germany"),
    ("The headquarters of {} is in", "Toyota", "Chicago", "Toyota City"),
]
REQUESTS = [EditRequest(prompt=p, subject=s, target_new=n, target_true=t) for p, s, n, t in FACTS]
# A random model's C has no eigenvalue below 1e-2 of its largest (P = 0, nothing is edited):
# the null-space methods get a wide null space here.
NULL_SPACE = {"alphaedit": {"nullspace_threshold": 0.5},
              "d4s-alphaedit": {"nullspace_threshold": 0.5}}


@pytest.fixture(scope="module", autouse=True)
def private_cache(tokenizer, tmp_path_factory):
    """Caches (C, templates) in a temporary folder: tiny models must not meet real ones.

    Depends on `tokenizer` so the built-in model is loaded from the real cache first.
    """
    if not CORPUS.is_dir():
        pytest.skip(f"covariance corpus not found at {CORPUS}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FACTEDIT_CACHE", str(tmp_path_factory.mktemp("factedit-cache")))
        yield


def small(**overrides):
    """Config fields for a fast, deterministic edit of the tiny model."""
    base = dict(layers=LAYERS, covariance_corpus=str(CORPUS), covariance_tokens=4096,
                v_steps=8, context_prefixes=2, context_length=5, condition_every=1)
    base.update(overrides)
    return base


def tiny(tokenizer, model_type="llama"):
    return make_tiny_model(tokenizer, model_type=model_type, seed=0)


def deltas(model, reference, layers=LAYERS) -> dict[int, torch.Tensor]:
    """W - W_reference of each edited layer, (d_out, d_in) float64."""
    return {layer: (model.weight(layer) - reference.weight(layer)).detach().double()
            for layer in layers}


def assert_same_edit(a, b, rtol):
    for layer in a:
        err = float((a[layer] - b[layer]).norm() / b[layer].norm())
        assert b[layer].norm() > 0, f"layer {layer} was not edited"
        assert err < rtol, f"layer {layer}: relative difference {err:.2e} >= {rtol}"


def test_sequential_d4s_equals_memit_batch_on_w0(tokenizer):
    """n sequential D4S edits == one MEMIT batch of the n requests on W_0 (residual once)."""
    w0, seq, batch = tiny(tokenizer), tiny(tokenizer), tiny(tokenizer)
    edit(seq, REQUESTS, method="d4s", mode="sequential", progress=False, **small())
    edit(batch, REQUESTS, method="memit", mode="batch", progress=False,
         **small(residual="once"))
    assert_same_edit(deltas(seq, w0), deltas(batch, w0), rtol=1e-4)


@pytest.mark.parametrize(("method", "resolve_every"), [("d4s", 3), ("d4s-alphaedit", 100)])
def test_incremental_solve_equals_full_solve(tokenizer, method, resolve_every, monkeypatch):
    """The recursive least-squares step lands on the full solve of the sums, with or
    without the periodic full re-solve, and removal afterwards stays exact."""
    from factedit.linalg import WoodburySolver
    from factedit.methods.locate.d4s import D4SEditor

    steps, added = [], []
    original_step, original_add = D4SEditor.update_sums, WoodburySolver.add
    monkeypatch.setattr(D4SEditor, "update_sums",
                        lambda self, *a: steps.append(a[0]) or original_step(self, *a))
    monkeypatch.setattr(WoodburySolver, "add",
                        lambda self, V: added.append(V.shape) or original_add(self, V))
    w0, full, incremental = tiny(tokenizer), tiny(tokenizer), tiny(tokenizer)
    options = small(**NULL_SPACE.get(method, {}))
    full_handle = edit(full, REQUESTS[:5], method=method, mode="sequential", progress=False,
                       **options)
    handle = edit(incremental, REQUESTS[:5], method=method, mode="sequential", progress=False,
                  solve="incremental", resolve_every=resolve_every, **options)
    assert_same_edit(deltas(incremental, w0), deltas(full, w0), rtol=1e-9)
    # The steps build their system only for the logged condition number: the same matrix.
    for ours, reference in zip(handle.records, full_handle.records, strict=True):
        for layer in LAYERS:
            assert ours.info["layers"][layer]["cond"] == pytest.approx(
                reference.info["layers"][layer]["cond"], rel=1e-8)
    # edit 0 solves in full (nothing to step from), and so does edit 3 when resolve_every=3
    assert len(steps) == len(LAYERS) * (3 if resolve_every == 3 else 4)
    # the step after a full solve factors its matrix; the steps after it reuse that factor
    assert len(added) == len(LAYERS) * (1 if resolve_every == 3 else 3)
    handle.remove(1)
    without = tiny(tokenizer)
    edit(without, [r for i, r in enumerate(REQUESTS[:5]) if i != 1], method=method,
         mode="sequential", progress=False, **options)
    assert_same_edit(deltas(incremental, w0), deltas(without, w0), rtol=1e-6)


@pytest.mark.parametrize("solve", ["full", "incremental"])
def test_d4s_alphaedit_sequential_fit_is_alphaedit(tokenizer, solve):
    """fit="sequential" with z, keys and residuals on the model as edited so far: every
    d4s-alphaedit step is AlphaEdit's update (S_KK playing K_p K_p^T), so the sequences land
    on the same weights; the reference fit="history" re-fits first targets and does not."""
    w0, ours, alphaedit, history = (tiny(tokenizer) for _ in range(4))
    shared = small(residual="per_layer", clamp_factor=0.75, alpha=10.0,
                   **NULL_SPACE["d4s-alphaedit"])
    edit(alphaedit, REQUESTS[:4], method="alphaedit", mode="sequential", progress=False,
         **shared)
    handle = edit(ours, REQUESTS[:4], method="d4s-alphaedit", mode="sequential",
                  progress=False, values_on="current", fit="sequential", solve=solve, **shared)
    assert_same_edit(deltas(ours, w0), deltas(alphaedit, w0), rtol=1e-9)
    edit(history, REQUESTS[:4], method="d4s-alphaedit", mode="sequential", progress=False,
         values_on="current", **shared)
    # (the tiny model's edits barely cross-talk, so "history" is off by only ~4e-4, still
    # far above the float64 rounding the identity is held to)
    with pytest.raises(AssertionError, match="relative difference"):
        assert_same_edit(deltas(history, w0), deltas(alphaedit, w0), rtol=1e-5)
    # The weight is still the solve of the two sums: a saved state resumes to the same model.
    tensors, manifest = handle.editor.state_dict()
    resumed = make_editor(w0, "d4s-alphaedit", config=json.loads(json.dumps(manifest["config"])))
    resumed.load_state_dict(tensors, json.loads(json.dumps(manifest)))
    for layer in LAYERS:
        W, _A = resumed.solve_sums(layer, resumed._s_rk[layer], resumed._s_kk[layer])
        torch.testing.assert_close(W, ours.weight(layer).double(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["memit", "pmet", "alphaedit", "d4s", "d4s-alphaedit"])
def test_compute_leaves_the_model_as_it_found_it(tokenizer, method):
    """compute() returns deltas and info; the weights are bit-identical afterwards."""
    model = tiny(tokenizer)
    before = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    result = make_editor(model, method, **small(**NULL_SPACE.get(method, {}))).compute(REQUESTS[:2])
    for name, p in model.model.named_parameters():
        assert torch.equal(p, before[name]), f"{method} changed {name}"
    assert set(result.deltas) == {f"model.layers.{layer}.mlp.down_proj.weight" for layer in LAYERS}
    for layer in LAYERS:
        stats = result.info["layers"][layer]
        assert stats["cond"] >= 1 and stats["mean_abs"] > 0 and stats["fro_change"] > 0
    json.dumps(result.info["layers"])  # the protocol stores info as JSON


@pytest.mark.parametrize("method", ["memit", "pmet", "alphaedit"])
def test_low_rank_solve_gives_the_direct_solves_edit(tokenizer, method, monkeypatch):
    """The factor kept between edits (lambda C for MEMIT and PMET, AlphaEdit's history
    system grown by each edit's keys) plus Woodbury gives the same weights as factoring the
    whole system afresh, edit after edit of a sequence (float64, to 1e-9)."""
    import factedit.methods.locate.alphaedit as alphaedit_module
    import factedit.methods.locate.memit as memit_module

    edited = {}
    for low_rank in (True, False):
        if not low_rank:  # the direct solve everywhere
            monkeypatch.setattr(memit_module, "memit_solve_is_low_rank", lambda K: False)
            monkeypatch.setattr(alphaedit_module.AlphaEditEditor, "_history_solver",
                                lambda self, layer: None)
        model, w0 = tiny(tokenizer), tiny(tokenizer)
        handle = edit(model, REQUESTS[:4], method=method, mode="sequential", progress=False,
                      **small(**NULL_SPACE.get(method, {})))
        edited[low_rank] = deltas(model, w0)
        # The fast path did run: the kept factors are there.
        kept = handle.editor._solvers if method == "alphaedit" else handle.editor._preserved_factors
        assert bool(kept) == low_rank
    assert_same_edit(edited[True], edited[False], rtol=1e-9)


def test_single_mode_derives_from_c_once(tokenizer, monkeypatch):
    """Single mode gives every edit a fresh editor; the null-space bases and the factors of
    lambda C (functions of C alone) are shared with it, not derived again per edit."""
    import factedit.methods.locate.base as locate_module

    calls = {"null_space_basis": 0, "preserved_factor": 0}
    for name in calls:
        original = getattr(locate_module, name)

        def counted(*args, _name=name, _original=original):
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(locate_module, name, counted)
    for method in ("alphaedit", "memit"):
        edit(tiny(tokenizer), REQUESTS[:3], method=method, mode="single", progress=False,
             **small(**NULL_SPACE.get(method, {})))
    assert calls == {"null_space_basis": len(LAYERS), "preserved_factor": len(LAYERS)}


def test_loading_a_state_drops_what_was_derived_from_the_old_c(tokenizer):
    """A loaded state replaces C; the null-space bases and factors of lambda C follow it."""
    editor = make_editor(tiny(tokenizer), "alphaedit", **small(**NULL_SPACE["alphaedit"]))
    layer = LAYERS[0]
    old_factor = editor.preserved_factor(layer, 1.0)
    old_basis = editor.null_basis(layer, 0.5)
    tensors, manifest = editor.state_dict()
    tensors = {k: 4 * v if k.startswith("C.") else v for k, v in tensors.items()}
    editor.load_state_dict(tensors, manifest)
    assert torch.allclose(editor.preserved_factor(layer, 1.0), 2 * old_factor)
    assert editor.null_basis(layer, 0.5) is not old_basis


def test_memit_on_gpt2_returns_conv1d_oriented_deltas(tokenizer):
    model = tiny(tokenizer, "gpt2")
    result = make_editor(model, "memit", **small()).compute(REQUESTS[:2])
    for layer in LAYERS:
        param = model.mlp_out(layer).weight  # Conv1D: (d_in, d_out)
        delta = result.deltas[f"transformer.h.{layer}.mlp.c_proj.weight"]
        assert delta.shape == param.shape and delta.norm() > 0


def test_alphaedit_update_is_blind_to_preserved_keys(tokenizer):
    """Delta K_0 = 0 for K_0 spanning the directions C keeps (outside P's range)."""
    model = tiny(tokenizer)
    C = make_editor(model, "alphaedit", **small()).covariance(LAYERS[0])
    evals = torch.linalg.eigvalsh(C)
    # A threshold between the eigenvalues, so both the null space and its complement are big.
    threshold = float(evals[len(evals) // 2] / evals.max()) * 1.0001
    editor = make_editor(model, "alphaedit", **small(nullspace_threshold=threshold))
    editor.compute(REQUESTS[:3])  # K_p K_p^T of an earlier edit enters the next solve
    result = editor.compute(REQUESTS[3:])
    for layer in LAYERS:
        C = editor.covariance(layer)
        evals, evecs = torch.linalg.eigh(C)
        K0 = evecs[:, evals >= threshold * evals.max()]
        assert 0 < K0.shape[1] < C.shape[0]
        delta = result.deltas[f"model.layers.{layer}.mlp.down_proj.weight"].double()
        leak = float((delta @ K0).norm() / (delta.norm() * K0.norm()))
        assert delta.norm() > 0 and leak < 1e-6, f"layer {layer}: leak {leak:.1e}"


@pytest.mark.parametrize("keep_history", [True, False])
def test_d4s_remove_equals_never_editing(tokenizer, keep_history):
    """Edit 5 sequentially, remove edit 2 == edit the other 4 sequentially."""
    w0, removed, without = tiny(tokenizer), tiny(tokenizer), tiny(tokenizer)
    handle = edit(removed, REQUESTS[:5], method="d4s", mode="sequential", progress=False,
                  **small(keep_history=keep_history))
    handle.remove(2)
    others = [r for i, r in enumerate(REQUESTS[:5]) if i != 2]
    edit(without, others, method="d4s", mode="sequential", progress=False, **small())
    assert_same_edit(deltas(removed, w0), deltas(without, w0), rtol=1e-6)
    assert handle.editor.live_edits == [0, 1, 3, 4]
    with pytest.raises(ValueError, match="edit_id=2"):
        handle.editor.remove(2)


@pytest.mark.parametrize("method", ["d4s", "d4s-alphaedit", "alphaedit"])
def test_save_and_resume_is_exact(tokenizer, tmp_path, method):
    """Edit 3, save the state, resume on a fresh editor, edit 2 more == edit 5 in one go."""
    w0, resumed, straight = tiny(tokenizer), tiny(tokenizer), tiny(tokenizer)
    options = small(**NULL_SPACE.get(method, {}))
    first = make_editor(resumed, method, **options)
    EditHandle(resumed, first).edit(REQUESTS[:3], mode="sequential", progress=False)
    tensors, manifest = first.state_dict()
    # Through the formats the protocol writes: safetensors + JSON.
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "state.safetensors"))
    manifest = json.loads(json.dumps(manifest))
    second = make_editor(resumed, method, config=manifest["config"])
    second.load_state_dict(load_file(str(tmp_path / "state.safetensors")), manifest)
    EditHandle(resumed, second).edit(REQUESTS[3:5], mode="sequential", progress=False)
    edit(straight, REQUESTS[:5], method=method, mode="sequential", progress=False, **options)
    if method.startswith("d4s"):
        assert second.live_edits == [0, 1, 2, 3, 4]
    assert_same_edit(deltas(resumed, w0), deltas(straight, w0), rtol=1e-6)


def test_rome_is_rank_one_and_lands_on_v_star(tokenizer):
    """W' k = W k + delta = v* (to float64 precision), and W' - W has rank one."""
    model = tiny(tokenizer)
    result = make_editor(model, "rome", **small(layers=[1])).compute(REQUESTS[:1])
    delta = result.deltas["model.layers.1.mlp.down_proj.weight"].double()
    W, k = model.weight(1).double(), result.info["key"]
    v_star = W @ k + result.info["target_delta"]
    assert torch.allclose((W + delta) @ k, v_star, rtol=1e-9, atol=1e-9)
    s = torch.linalg.svdvals(delta)
    assert s[0] > 0 and s[1] / s[0] < 1e-10


@pytest.mark.parametrize("config_cls, field, value", [
    (MemitConfig, "mom2_update_weight", -1.0),
    (MemitConfig, "residual", "twice"),
    (PmetConfig, "residual", "sometimes"),
    (AlphaEditConfig, "nullspace_threshold", 2.0),
    (AlphaEditConfig, "alpha", 0.0),
    (D4SConfig, "values_on", "yesterday"),
    (D4SConfig, "fit", "batch"),
    (D4SConfig, "keep_history", "yes"),
    (D4SAlphaEditConfig, "alpha", -3.0),
    (RomeConfig, "solve_key", "median"),
    (D4SConfig, "key_prefixes", -1),
])
def test_config_rejects_a_bad_field_by_name(config_cls, field, value):
    with pytest.raises(ConfigError, match=field):
        config_cls(**{field: value})


@pytest.mark.parametrize("method", ["rome", "memit", "pmet", "alphaedit", "d4s", "d4s-alphaedit"])
def test_unknown_field_and_missing_layer(tokenizer, method):
    model = tiny(tokenizer)
    with pytest.raises(ConfigError, match="bogus_field"):
        make_editor(model, method, config={"bogus_field": 1})
    with pytest.raises(LayerIndexError, match="99"):
        make_editor(model, method, layers=[99])


def _step_without_prepare(model, method, requests, **config):
    """The same sequence, each request's values optimised alone inside compute."""
    handle = EditHandle(model, make_editor(model, method, **config))
    for request in requests:
        handle.step([request])
    return handle


@pytest.mark.parametrize("method,residual", [("d4s", "once"), ("d4s", "per_layer"),
                                             ("rome", None)])
def test_values_prepared_in_batches_equal_values_optimised_alone(tokenizer, method, residual):
    """The protocol optimises history-free target values ahead, several requests per forward
    pass (d4s sequential on W_0 with either residual mode, any method in single mode); the
    edits equal one-at-a-time values."""
    layers = [1] if method == "rome" else LAYERS
    config = small(layers=layers, value_batch_size=4)
    if residual is not None:
        config["residual"] = residual
    w0, ahead, alone = tiny(tokenizer), tiny(tokenizer), tiny(tokenizer)
    mode = "sequential" if method == "d4s" else "single"
    captured = []
    handle = edit(ahead, REQUESTS, method=method, mode=mode, progress=False,
                  evaluate=lambda m, reqs: captured.append(deltas(m, w0, layers)), **config)
    assert not handle.editor._prepared, "every prepared value is used exactly once"
    if method == "d4s":
        assert handle.editor.values_independent_of_history, "z is prepared on W_0 ahead"
        _step_without_prepare(alone, method, REQUESTS, **config)
        assert_same_edit(deltas(ahead, w0, layers), deltas(alone, w0, layers), rtol=1e-6)
    else:  # single mode: compare the last request's edit, made alone on W_0
        _step_without_prepare(alone, method, REQUESTS[-1:], **config)
        assert_same_edit(captured[-1], deltas(alone, w0, layers), rtol=1e-6)


def test_run_sequence_prepares_values_one_stretch_at_a_time(tokenizer, monkeypatch):
    """A sequence prepares history-free values up to its next checkpoint (rounded up to whole
    value batches), not all of them before the first edit: the first checkpoint of a 10,000-
    edit run does not wait for 10,000 values. The edits equal values optimised alone."""
    from factedit.methods.locate.d4s import D4SEditor
    from factedit.protocol.sequence import run_sequence

    prepared: list[list[int]] = []
    scored_after: list[int] = []
    real_prepare = D4SEditor.prepare

    def spy(self, requests, progress=False):
        prepared.append([REQUESTS.index(r) for r in requests])
        return real_prepare(self, requests, progress=progress)

    monkeypatch.setattr(D4SEditor, "prepare", spy)
    config = small(value_batch_size=2)
    w0, staged, alone = tiny(tokenizer), tiny(tokenizer), tiny(tokenizer)
    report = run_sequence(staged, REQUESTS, "d4s", eval_at=[3], immediate=False, unedited=False,
                          progress=False, baseline={},
                          score=lambda edited: scored_after.append(len(prepared)) or {},
                          **config)
    # The checkpoint after 3 edits is scored after one stretch ([0, 4): 3 rounded up to the
    # batch of 2) and before the next ([4, 6)).
    assert prepared == [[0, 1, 2, 3], [4, 5]]
    assert scored_after == [1, 2]
    assert not report.handle.editor._prepared, "every prepared value is used exactly once"
    assert report.n_prepared == len(REQUESTS) and report.prepare_seconds > 0
    _step_without_prepare(alone, "d4s", REQUESTS, **config)
    assert_same_edit(deltas(staged, w0), deltas(alone, w0), rtol=1e-6)


def test_timings_count_the_work_prepared_ahead_of_the_edits(tokenizer):
    """Single mode computes C and every request's values in `prepare`, before any record
    exists: the handle's timings and summary still count that time (the demo printed
    "covariance statistics 0.0 s" for a 30 s covariance)."""
    model = tiny(tokenizer)
    handle = edit(model, REQUESTS[:3], method="rome", mode="single", progress=False,
                  **small(layers=[1], value_batch_size=4))
    ahead = handle.prepare_timings
    assert set(ahead) >= {"covariance", "values"}
    in_records = sum(r.timings.get("values", 0.0) for r in handle.records)
    # The records only take the prepared values: the optimisation happened ahead.
    assert ahead["values"] > in_records
    timings = handle.timings()
    assert timings["covariance"] >= ahead["covariance"] > 0
    assert timings["values"] == pytest.approx(ahead["values"] + in_records)
    assert handle.summary()["seconds"] >= sum(ahead.values())


@pytest.mark.parametrize("method", ["memit", "pmet"])
def test_a_large_edit_batch_optimises_its_values_in_value_batches(tokenizer, method,
                                                                 monkeypatch):
    """In sequential-batch mode (values on the model as edited so far, nothing prepared) an
    edit batch larger than value_batch_size optimises its target values that many requests
    at a time (one joint optimisation of 1,024 requests passed 12 GB on the built-in model).
    The edit equals the one whose values were optimised in one piece."""
    cls = type(make_editor(tiny(tokenizer), method, **small()))
    sizes, original = [], cls.compute_target
    monkeypatch.setattr(cls, "compute_target",
                        lambda self, reqs: sizes.append(len(reqs)) or original(self, reqs))
    w0, chunked, whole = tiny(tokenizer), tiny(tokenizer), tiny(tokenizer)
    batch = dict(method=method, mode="sequential-batch", batch_size=len(REQUESTS),
                 progress=False)
    edit(chunked, REQUESTS, **batch, **small(value_batch_size=4))
    assert sizes == [4, 2]
    edit(whole, REQUESTS, **batch, **small(value_batch_size=len(REQUESTS)))
    assert sizes[2:] == [len(REQUESTS)]
    assert_same_edit(deltas(chunked, w0), deltas(whole, w0), rtol=1e-6)


def test_memit_sequential_does_not_prepare(tokenizer):
    """MEMIT's sequential values depend on the edits before them: nothing is computed ahead."""
    model = tiny(tokenizer)
    editor = make_editor(model, "memit", **small())
    EditHandle(model, editor).prepare(REQUESTS, "sequential", progress=False)
    assert not editor._prepared and not editor.values_independent_of_history


def test_condition_every_logs_the_condition_number_on_schedule(tokenizer):
    model = tiny(tokenizer)
    handle = edit(model, REQUESTS[:3], method="d4s", mode="sequential", progress=False,
                  **small(condition_every=2))
    logged = ["cond" in r.info["layers"][LAYERS[0]] for r in handle.records]
    assert logged == [True, False, True]


def test_value_cache_reuses_values_and_refuses_other_weights(tokenizer):
    """value_cache=True: a second editor reads the values the first computed (the same
    tensors, no Adam step), an edited model misses, and a corrupt entry is recomputed."""
    from factedit.linalg.value_cache import ValueCache

    config = small(value_cache=True, value_batch_size=3)
    model = tiny(tokenizer)
    first = make_editor(model, "d4s", **config)
    first.prepare(REQUESTS[:3])
    computed = {k: v.delta.clone() for k, v in first._prepared.items()}

    second = make_editor(model, "d4s", **config)
    second.compute_target = None  # any Adam step would now fail
    second.prepare(REQUESTS[:3])
    assert {k: v.delta for k, v in second._prepared.items()}.keys() == computed.keys()
    for key, delta in computed.items():
        assert torch.equal(second._prepared[key].delta, delta)
    # d4s-alphaedit optimises the same values (only its solve differs): it reads them too.
    sibling = make_editor(model, "d4s-alphaedit", **config, **NULL_SPACE["d4s-alphaedit"])
    sibling.compute_target = None
    sibling.prepare(REQUESTS[:3])
    assert all(torch.equal(sibling._prepared[k].delta, d) for k, d in computed.items())

    # One weight changed (outside the edited layers too): another setting, nothing shared.
    other = tiny(tokenizer)
    with torch.no_grad():
        other.model.model.layers[3].mlp.down_proj.weight[0, 0] += 1.0
    third = make_editor(other, "d4s", **config)
    with third.edit_session(EditResult(), third.values_start(), is_edit=False):
        assert third.value_cache().folder != first_folder(first)
        assert not third.value_cache().load_many(REQUESTS[:3])

    path = ValueCache.request_name(REQUESTS[0])
    entry = first_folder(first) / f"{path}.safetensors"
    entry.write_bytes(entry.read_bytes()[:-8] + b"\0" * 8)
    fourth = make_editor(model, "d4s", **config)
    with pytest.warns(UserWarning, match="target-value cache .* is corrupt"):
        fourth.prepare(REQUESTS[:1])
    (key, recomputed), = fourth._prepared.items()
    assert torch.allclose(recomputed.delta, computed[key], rtol=1e-6, atol=1e-9)


def test_prepare_reads_values_stored_by_another_process_meanwhile(tokenizer, tmp_path):
    """prepare re-reads the cache before each batch: values another process stored after
    this one started (bench/fill_values.py from the other end) are read, not recomputed."""
    config = small(value_cache=True, value_batch_size=2)
    model = tiny(tokenizer)
    other = make_editor(model, "d4s", **config)
    other.prepare(REQUESTS[2:4])
    folder = first_folder(other)
    for entry in folder.iterdir():  # not there yet when `first` starts
        entry.rename(tmp_path / entry.name)

    first = make_editor(model, "d4s", **config)
    compute, batches = first.compute_target, []

    def compute_while_the_other_stores(batch):
        batches.append(len(batch))
        values = compute(batch)
        for entry in tmp_path.iterdir():  # the other process stores its two meanwhile
            entry.rename(folder / entry.name)
        return values

    first.compute_target = compute_while_the_other_stores
    first.prepare(REQUESTS[:4])
    assert batches == [2]  # the second batch was read, not optimised
    assert len(first._prepared) == 4
    for key, values in other._prepared.items():
        assert torch.equal(first._prepared[key].delta, values.delta)


def test_key_prefixes_average_the_keys_and_leave_the_values_alone(tokenizer):
    """key_prefixes=2 with bare-prompt values: keys are the means over the two prefixed
    contexts and the bare prompt, the values' cache setting is the bare one's, and a saved
    state brings the key contexts back."""
    from factedit.linalg import compute_keys
    from factedit.linalg.context import context_templates

    model = tiny(tokenizer)
    bare = make_editor(model, "d4s", **small(context_prefixes=0, value_cache=True))
    keyed = make_editor(model, "d4s", **small(context_prefixes=0, key_prefixes=2,
                                              value_cache=True))
    templates = context_templates(model, 2, 5, 0)
    assert keyed.templates() == ["{}"] and len(keyed.key_templates()) == 3
    expected = compute_keys(model, REQUESTS[:2], [2], templates)[2]
    assert torch.allclose(keyed.keys(REQUESTS[:2], [2])[2], expected, rtol=1e-12)
    assert not torch.allclose(bare.keys(REQUESTS[:2], [2])[2], expected, rtol=1e-3)
    assert first_folder(keyed) == first_folder(bare)
    EditHandle(model, keyed).edit(REQUESTS[:1], mode="sequential", progress=False)
    tensors, manifest = keyed.state_dict()
    resumed = make_editor(model, "d4s", config=json.loads(json.dumps(manifest["config"])))
    resumed.load_state_dict(tensors, json.loads(json.dumps(manifest)))
    assert resumed.key_templates() == keyed.key_templates()


def first_folder(editor):
    with editor.edit_session(EditResult(), editor.values_start(), is_edit=False):
        return editor.value_cache().folder


def test_null_space_update_equals_alphaedit_reference_formula():
    """Delta = (B U)(U^T S U + alpha I)^{-1} U^T equals the reference's
    B P (S P + alpha I)^{-1} (a general solve, float64) for P = U U^T."""
    from factedit.linalg import null_space_basis, null_space_update

    g = torch.Generator().manual_seed(0)
    d_in, d_out, n, alpha = 24, 10, 5, 0.7
    X = torch.randn(d_in, 200, generator=g, dtype=torch.float64)
    C = (X * torch.linspace(0.01, 3, d_in, dtype=torch.float64)[:, None]) @ X.T / 200
    U = null_space_basis(C, 0.3)
    assert 0 < U.shape[1] < d_in
    P = U @ U.T
    K = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    S = K @ K.T + torch.randn(d_in, 3, generator=g, dtype=torch.float64).pow(2).sum(1).diag()
    B = torch.randn(d_out, n, generator=g, dtype=torch.float64) @ K.T
    reference = torch.linalg.solve((S @ P + alpha * torch.eye(d_in, dtype=torch.float64)).T,
                                   (B @ P).T).T
    delta, A = null_space_update(U, B @ U, U.T @ S @ U, alpha)
    assert A.shape == (U.shape[1], U.shape[1])
    torch.testing.assert_close(delta, reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("model_type,site", [("llama", "mlp_out"), ("llama", "attn_out"),
                                              ("gpt2", "residual")])
def test_layer_by_layer_reads_equal_reads_from_the_embeddings(tokenizer, model_type, site):
    """MEMIT's per-layer loop reads K at l_j and h at z's site after writing l_{j-1}: one pass
    from block l_{j-1}'s kept input gives what compute_keys and site_values read from the
    embeddings (prefixed templates, several batches, the weights changed between reads)."""
    from factedit.linalg import LayerByLayerReads, compute_keys, site_module_name, site_values
    from factedit.linalg.context import context_templates

    model = tiny(tokenizer, model_type)
    templates = context_templates(model, 2, 5, 0)
    requests, layers, z_layer = REQUESTS[:3], [0, 2, 3], 3
    # keep_bytes=0: the same reads with every pass from the embeddings (nothing kept)
    reads, uncached = (LayerByLayerReads(model, requests, templates, z_layer,
                                         site_module_name(model, z_layer, site), batch_size=4,
                                         keep_bytes=keep) for keep in (2**30, 0))
    generator = torch.Generator().manual_seed(1)
    for j, layer in enumerate(layers):
        K, h = reads.read(layer, with_site=j > 0)
        assert torch.allclose(uncached.read(layer, with_site=j > 0)[0], K, rtol=1e-10,
                              atol=1e-12)
        assert uncached._kept is None and reads._kept is not None
        assert torch.allclose(K, compute_keys(model, requests, [layer], templates)[layer],
                              rtol=1e-10, atol=1e-12)
        if j == 0:
            assert h is None
        else:
            assert torch.allclose(h, site_values(model, requests, z_layer, site),
                                  rtol=1e-10, atol=1e-12)
        # Write the layer just read, as the loop does, so the next read must see it.
        weight = model.mlp_out(layer).weight
        with torch.no_grad():
            weight.add_(0.5 * torch.randn(weight.shape, generator=generator, dtype=weight.dtype))
    with pytest.raises(ValueError, match="layers must increase"):
        reads.read(1)


@pytest.mark.parametrize("residual", ["once", "per_layer"])
def test_key_columns_each_adds_the_spread_of_context_keys_to_s_kk(tokenizer, residual):
    """key_columns="each": one column per key template with weight 1/n. Against the mean
    key, R K^T is unchanged and K K^T gains sum_t (k_t - k_mean)(k_t - k_mean)^T / n."""
    from factedit.linalg import compute_keys

    model = tiny(tokenizer)
    mean, each = (make_editor(model, "memit", **small(residual=residual, key_columns=columns))
                  for columns in ("mean", "each"))
    requests = REQUESTS[:2]
    values = mean.compute_target(requests)
    # The first layer's terms: read before any layer of this edit is written.
    _, layer, K_mean, R_mean = next(mean.layer_terms(requests, values, residual))
    _, _, K_each, R_each = next(each.layer_terms(requests, values, residual))
    n_templates = len(mean.key_templates())
    assert n_templates == 3 and K_each.shape[1] == len(requests) * n_templates
    assert torch.allclose(R_each @ K_each.T, R_mean @ K_mean.T, rtol=1e-10, atol=1e-12)
    per_context = compute_keys(model, requests, [layer], mean.key_templates(), each=True)[layer]
    spread = per_context.view(len(requests), n_templates, -1) - K_mean.T.unsqueeze(1)
    expected = K_mean @ K_mean.T + torch.einsum("qtd,qte->de", spread, spread) / n_templates
    assert torch.allclose(K_each @ K_each.T, expected, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(K_each @ K_each.T, K_mean @ K_mean.T, rtol=1e-3)


@pytest.mark.parametrize("residual", ["per_layer", "once"])
def test_bare_key_weight_weighs_the_bare_column(tokenizer, residual):
    """bare_key_weight=b: the bare prompt's column weighs b, the two prefixed ones (1-b)/2:
    R K^T = sum_q R_q sum_t w_t k_qt^T and K K^T = sum_q sum_t w_t k_qt k_qt^T."""
    from factedit.linalg import compute_keys

    model = tiny(tokenizer)
    editor = make_editor(model, "memit", **small(residual=residual, key_columns="each",
                                                 bare_key_weight=0.6))
    requests = REQUESTS[:2]
    values = editor.compute_target(requests)
    _, layer, K, R = next(editor.layer_terms(requests, values, residual))
    keys = compute_keys(model, requests, [layer], editor.key_templates(), each=True)[layer]
    keys = keys.view(len(requests), 3, -1)
    w = torch.tensor([0.6, 0.2, 0.2], dtype=torch.float64)
    R_q = R[:, ::3] / w[0].sqrt()  # each request's residual, from its bare column
    assert torch.allclose(R @ K.T, R_q @ torch.einsum("t,qtd->qd", w, keys),
                          rtol=1e-10, atol=1e-12)
    assert torch.allclose(K @ K.T, torch.einsum("t,qtd,qte->de", w, keys, keys),
                          rtol=1e-10, atol=1e-12)


def test_key_columns_is_checked():
    with pytest.raises(ConfigError, match="key_columns"):
        MemitConfig(key_columns="all")
    with pytest.raises(ConfigError, match="rank-one"):
        RomeConfig(key_columns="each")
    with pytest.raises(ConfigError, match="bare_key_weight.*key_columns"):
        MemitConfig(bare_key_weight=0.5)
    with pytest.raises(ConfigError, match="bare_key_weight"):
        MemitConfig(key_columns="each", bare_key_weight=1.5)
    # Refused when the config is built, not when the first solve reads the templates.
    with pytest.raises(ConfigError, match="context_prefixes or key_prefixes"):
        MemitConfig(key_columns="each", bare_key_weight=0.5, context_prefixes=0)
    with pytest.raises(ConfigError, match="context_prefixes or key_prefixes"):
        MemitConfig(key_columns="each", bare_key_weight=0.5, context_prefixes=3,
                    key_prefixes=0)
    MemitConfig(key_columns="each", bare_key_weight=0.5, context_prefixes=0, key_prefixes=2)
