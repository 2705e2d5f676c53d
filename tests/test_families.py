"""Every model family factedit's architecture table names, edited by one method of each kind.

A tiny random model of each family (2 layers, width 32, float64) is built from its own
`transformers` config class (tests/helpers.py), so the family's real modelling code runs:
Gemma's soft caps and post-MLP norms, GPT-J's and Phi's parallel blocks, Phi-3's fused
gate/up projection, OLMo-2's post-norms, GPT-2's Conv1D. Each is edited through `fe.edit`,
the path a real model takes, by ROME and D4S (locate-then-edit), FT-L (fine-tuning), GRACE
(codebook), T-Patcher (added neurons) and IKE (in-context). For every pair:

- the edit lands: the request's target gets clearly more likely (weight editors, GRACE,
  T-Patcher), or, for IKE, whose context a random model cannot follow, the prompt's output
  changes while the memory is attached;
- restore() is exact: every parameter bit-equal to the unedited model, equal logits;
- save then resume on a fresh model of the same seed gives the edited weights and logits.

No family in the table is refused by these methods. A family outside the table is refused
(with the override that fixes it named in the error), and the override makes it editable.
"""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_FAMILIES, make_family_model

from factedit import EditRequest
from factedit.metrics.scoring import score_pairs
from factedit.models import UnknownArchitectureError
from factedit.protocol import EditHandle, edit
from factedit.text import encode

# The subject ends the prompt: in a random model attention carries little from the subject
# to a later position, so a fact read at the subject's last token must be read right there.
REQUEST = EditRequest(prompt="The mother tongue of {}", subject="Vladimir Putin",
                      target_new="French", target_true="Russian")
LOCATE = dict(covariance_tokens=512, covariance_seq_len=32, v_steps=6, context_prefixes=0)
SETTINGS = {
    "rome": dict(LOCATE, layers=[1]),
    "d4s": dict(LOCATE, layers=[0, 1]),
    "ft-l": dict(layers=[1], steps=5, lr=1e-2, norm_constraint=None),
    "grace": dict(layer=1, eps=1e-3, steps=10, lr=0.5),
    "t-patcher": dict(steps=15, lr=0.1),
    "ike": dict(threshold=-1, retrieval_layer=1),
}
WEIGHT_METHODS = {"rome", "d4s", "ft-l"}  # the others act through hooks or the prompt
MARGIN = 1.0  # nats the target's NLL must drop (measured drops: 1.2 to 8.5)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """A few kilobytes of fixed text for C: the tiny tokenizer encodes it in milliseconds."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(" ".join(
        f"The city of {a} is in {b}, where people speak {c} and play {d}."
        for a in ("Paris", "Rome", "Berlin", "Madrid", "Tokyo", "Cairo")
        for b in ("France", "Italy", "Germany", "Spain", "Japan", "Egypt")
        for c in ("French", "Italian", "German") for d in ("tennis", "golf")))
    return str(path)


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """Caches (C) in a temporary folder: tiny models must not meet real ones."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FACTEDIT_CACHE", str(tmp_path_factory.mktemp("factedit-cache")))
        yield


def target_nll(model) -> float:
    pair = (REQUEST.rewrite_prompt, REQUEST.target_new)
    return score_pairs(model, [pair])[pair].mean_nll


def prompt_logits(model) -> torch.Tensor:
    ids = torch.tensor([encode(model.tokenizer, REQUEST.rewrite_prompt)])
    with torch.no_grad():
        return model.model(input_ids=ids).logits


def parameters(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.model.state_dict().items()}


def assert_equal_parameters(model, expected: dict[str, torch.Tensor]) -> None:
    now = model.model.state_dict()
    assert now.keys() == expected.keys()
    differ = [name for name in expected if not torch.equal(now[name], expected[name])]
    assert not differ, f"parameters differ: {differ}"


@pytest.mark.parametrize("method", list(SETTINGS))
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_edit_lands_restores_and_resumes(tokenizer, corpus, tmp_path, family, method):
    model = make_family_model(tokenizer, family)
    unedited, unedited_logits, nll_before = parameters(model), prompt_logits(model), \
        target_nll(model)
    options = dict(SETTINGS[method])
    if "covariance_tokens" in options:
        options["covariance_corpus"] = corpus
    handle = edit(model, [REQUEST], method=method, progress=False, **options)

    edited_logits = prompt_logits(model)
    assert torch.isfinite(edited_logits).all()
    assert not torch.equal(edited_logits, unedited_logits)
    if method != "ike":
        assert target_nll(model) < nll_before - MARGIN
    edited = parameters(model)
    changed = {name for name in edited if not torch.equal(edited[name], unedited[name])}
    if method in WEIGHT_METHODS:  # exactly the configured layers' MLP output projections
        assert changed == set(handle.originals) and changed
    else:
        assert not changed
    handle.save(tmp_path / "state")

    handle.restore()
    assert_equal_parameters(model, unedited)
    assert torch.equal(prompt_logits(model), unedited_logits)

    fresh = make_family_model(tokenizer, family)
    EditHandle.resume(fresh, tmp_path / "state")
    assert_equal_parameters(fresh, edited)
    assert torch.equal(prompt_logits(fresh), edited_logits)


# Bloom: a family outside the table, described to factedit by the override in the error.
BLOOM = dict(layers="transformer.h", mlp="mlp", mlp_in="mlp.dense_h_to_4h",
             mlp_out="mlp.dense_4h_to_h", attn_out="self_attention.dense",
             embed="transformer.word_embeddings", final_norm="transformer.ln_f",
             lm_head="lm_head")


def test_family_outside_the_table_is_refused_and_the_override_edits_it(tokenizer, corpus):
    from transformers import AutoModelForCausalLM, BloomConfig

    import factedit as fe

    torch.manual_seed(0)
    config = BloomConfig(vocab_size=len(tokenizer), hidden_size=32, n_layer=2, n_head=4,
                         initializer_range=0.2, pad_token_id=tokenizer.pad_token_id)
    hf_model = AutoModelForCausalLM.from_config(config).double()
    with pytest.raises(UnknownArchitectureError, match=r"model_type='bloom'.*Pass arch="):
        fe.models.resolve_arch(hf_model.config)
    model = fe.EditableModel(hf_model, tokenizer, fe.models.resolve_arch(hf_model.config, BLOOM),
                             "tiny-bloom")
    before = target_nll(model)
    handle = edit(model, [REQUEST], method="rome", progress=False, covariance_corpus=corpus,
                  **SETTINGS["rome"])
    assert target_nll(model) < before - MARGIN
    handle.restore()
    assert target_nll(model) == before


def test_a_head_named_by_another_transformers_version_is_found(tokenizer):
    """GPT-NeoX's head was `embed_out` before transformers 5: a table that names it still
    resolves, to the module the loaded model returns from get_output_embeddings()."""
    import factedit as fe

    model = make_family_model(tokenizer, "gpt_neox")
    old_table = fe.models.resolve_arch(model.model.config, {"lm_head": "embed_out"})
    assert old_table.lm_head == "embed_out"
    assert fe.EditableModel(model.model, tokenizer, old_table, "tiny").arch.lm_head == "lm_head"


# The other registered methods (hypernetworks, which need a trained network, aside) on the
# three layouts the other test files never build: Phi-3's fused MLP input, GPT-J's parallel
# block, OLMo-2's post-norms. Each must run and restore bit for bit.
OTHER_SETTINGS = {
    "memit": dict(LOCATE, layers=[0, 1]), "pmet": dict(LOCATE, layers=[0, 1]),
    "alphaedit": dict(LOCATE, layers=[0, 1], nullspace_threshold=0.5),
    "d4s-alphaedit": dict(LOCATE, layers=[0, 1], nullspace_threshold=0.5),
    "ft-m": dict(layers=[1], steps=3, lr=1e-2), "kn": dict(ig_steps=3, update_scale=20.0),
    "calinet": dict(layers=[1], steps=5, lr=0.1),
    "memprompt": dict(threshold=0.99999, retrieval_layer=1),
    "mello": dict(max_hops=1, max_new_tokens=4),
}


@pytest.mark.parametrize("family", ["phi3", "gptj", "olmo2"])
def test_other_methods_run_and_restore(tokenizer, corpus, family):
    from factedit.methods import list_methods

    others = [m for m in OTHER_SETTINGS if m in list_methods()]
    assert len(others) == len(OTHER_SETTINGS), sorted(set(OTHER_SETTINGS) - set(others))
    requests = [REQUEST, EditRequest(prompt="The sport of {}", subject="Serena Williams",
                                     target_new="golf", target_true="tennis")]
    for method in others:
        model = make_family_model(tokenizer, family)
        unedited, unedited_logits = parameters(model), prompt_logits(model)
        options = dict(OTHER_SETTINGS[method])
        if "covariance_tokens" in options:
            options["covariance_corpus"] = corpus
        handle = edit(model, requests, method=method, mode="sequential", progress=False,
                      **options)
        assert torch.isfinite(prompt_logits(model)).all(), method
        handle.restore()
        assert_equal_parameters(model, unedited)
        assert torch.equal(prompt_logits(model), unedited_logits), method


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "olmo2", "llama"])
def test_pmet_warns_where_the_mlp_output_is_normalised(tokenizer, family, caplog):
    # Gemma 2/3 and OLMo 2 normalise the MLP output before the residual (the architecture
    # table's post_mlp_norm). The residual-site editors write each layer's share through that
    # norm (linalg.residual_to_mlp_output, tests/test_solve.py) and ROME optimises through
    # it; PMET carries an MLP-output target over layers, which does not model it, and says so.
    from factedit.protocol import make_editor

    model = make_family_model(tokenizer, family)
    with caplog.at_level("WARNING", logger="factedit"):
        for method in ("d4s", "memit", "alphaedit", "rome", "pmet"):
            make_editor(model, method)
    warned = [r.getMessage() for r in caplog.records if "post_feedforward_layernorm" in r.getMessage()]
    assert len(warned) == (0 if family == "llama" else 1), warned
    if warned:
        assert warned[0].startswith("PmetEditor")
