"""Patch files on a tiny float64 model (exact algebra) and the CLI around them.

apply(patch) gives the edited weights to the recorded error, revert gives the base back, a
diff of a ROME edit is rank one, two patches in order equal the two edits in sequence, and a
wrong base, a changed or truncated file, another dtype are refused with nothing written.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model

import factedit as fe
from factedit.cli import main
from factedit.patch import Patch, PatchError
from factedit.patch.gguf import permute_rotary

EIFFEL = fe.EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower",
                        target_new="Rome", target_true="Paris")
MESSI = fe.EditRequest(prompt="{} plays the sport of", subject="Lionel Messi",
                       target_new="tennis", target_true="football")
FAST = dict(v_steps=3, context_prefixes=1, covariance_tokens=512, covariance_seq_len=32)


def weights(model):
    return {n: p.detach().clone() for n, p in model.model.named_parameters()}


def max_diff(a, b):
    return max(float((a[n] - b[n]).abs().max()) for n in a)


@pytest.fixture(scope="module")
def edits(tokenizer, shared_data, tmp_path_factory):
    """One tiny model edited twice in sequence (EIFFEL, then MESSI), a patch of each edit,
    and the weights before, between and after."""
    corpus = str(shared_data / "corpus" / "wikitext-2-raw")
    model = make_tiny_model(tokenizer)
    base = weights(model)
    first = fe.edit(model, [EIFFEL], method="rome", covariance_corpus=corpus, progress=False,
                    **FAST)
    patch1 = Patch.from_handle(first, [EIFFEL], {"efficacy": 1.0})
    middle = weights(model)
    second = fe.edit(model, [MESSI], method="rome", covariance_corpus=corpus, progress=False,
                     **FAST)
    patch2 = Patch.from_handle(second, [MESSI])
    folder = tmp_path_factory.mktemp("patches")
    return dict(model=model, base=base, middle=middle, after=weights(model), patch1=patch1,
                patch2=patch2, p1=patch1.save(folder / "eiffel.safetensors"),
                p2=patch2.save(folder / "messi.safetensors"))


def test_apply_equals_the_edit_and_revert_the_base(tokenizer, edits):
    patch = Patch.load(edits["p1"])
    (name, info), = patch.meta["weights"].items()
    assert info["form"] == "lowrank" and info["rank"] == 1  # ROME: rank one per edit
    assert patch.requests[0].uid == EIFFEL.uid and patch.meta["scores"] == {"efficacy": 1.0}
    fresh = make_tiny_model(tokenizer)
    assert patch.check_base(fresh)["exact"]
    patch.apply(fresh)
    now = weights(fresh)
    error = float((now[name] - edits["middle"][name]).norm())
    assert error <= info["error_fro"] * (1 + 1e-6) + 1e-12 and info["error_fro"] < 1e-6
    assert all(torch.equal(now[n], edits["base"][n]) for n in now if n != name)
    with pytest.raises(PatchError, match="already applied"):
        patch.apply(fresh)  # the model is no longer the base
    patch.revert(fresh)
    assert max_diff(weights(fresh), edits["base"]) < 1e-13


def test_two_patches_in_order_equal_the_two_edits(tokenizer, edits):
    fresh = make_tiny_model(tokenizer)
    with pytest.raises(PatchError, match="not this patch's base"):
        edits["patch2"].apply(fresh)  # made after the first edit: needs it applied first
    assert max_diff(weights(fresh), edits["base"]) == 0  # refused before writing anything
    edits["patch1"].apply(fresh)
    edits["patch2"].apply(fresh)
    recorded = sum(i["error_fro"] for p in ("patch1", "patch2")
                   for i in edits[p].meta["weights"].values())
    assert max_diff(weights(fresh), edits["after"]) <= recorded + 1e-12
    with pytest.raises(PatchError, match="reverse order"):
        edits["patch1"].revert(fresh)
    edits["patch2"].revert(fresh)
    edits["patch1"].revert(fresh)
    assert max_diff(weights(fresh), edits["base"]) < 1e-12


def test_diff_of_a_rome_edit_is_rank_one(tokenizer, edits):
    edited = make_tiny_model(tokenizer)
    edits["patch1"].apply(edited)
    patch = Patch.diff(make_tiny_model(tokenizer), edited, dtype="float64")
    (info,) = patch.meta["weights"].values()
    assert info["form"] == "lowrank" and info["rank"] == 1 and info["relative_error"] < 1e-12
    assert patch.describe()["sizes"]["tensor_bytes"] < patch.describe()["sizes"]["dense_delta_bytes"] / 10


def test_damaged_files_and_wrong_models_are_refused(tokenizer, edits, tmp_path):
    data = edits["p1"].read_bytes()
    tampered = bytearray(data)
    tampered[-3] ^= 0x01  # one bit of the tensor data
    (tmp_path / "tampered.safetensors").write_bytes(bytes(tampered))
    (tmp_path / "truncated.safetensors").write_bytes(data[:-40])
    with pytest.raises(PatchError, match="checksum"):
        Patch.load(tmp_path / "tampered.safetensors")
    with pytest.raises(PatchError, match="truncated"):
        Patch.load(tmp_path / "truncated.safetensors")
    other = make_tiny_model(tokenizer, seed=1)  # same architecture, other weights
    before = weights(other)
    with pytest.raises(PatchError, match="base fingerprint"):
        edits["patch1"].apply(other)
    assert max_diff(weights(other), before) == 0
    with pytest.raises(PatchError, match="config"):
        edits["patch1"].apply(make_tiny_model(tokenizer, hidden=32))
    with pytest.raises(PatchError, match="dtype=float64"):
        edits["patch1"].apply(make_tiny_model(tokenizer, dtype=torch.float32))


def test_grace_patch_carries_the_codebook(tokenizer):
    model = make_tiny_model(tokenizer, layers=3)
    handle = fe.edit(model, [EIFFEL], method="grace", layer=1, eps=1e-3, steps=40, lr=0.5,
                     progress=False)
    ids = torch.tensor([tokenizer.encode(EIFFEL.rewrite_prompt)])
    with torch.no_grad():
        edited = model.model(input_ids=ids).logits
    patch = Patch.from_bytes(Patch.from_handle(handle, [EIFFEL]).to_bytes())
    assert patch.needs_factedit and patch.meta["weights"] == {}
    fresh = make_tiny_model(tokenizer, layers=3)
    with torch.no_grad():
        plain = fresh.model(input_ids=ids).logits
    patch.apply(fresh)
    with torch.no_grad():
        assert torch.equal(fresh.model(input_ids=ids).logits, edited)
    patch.revert(fresh)
    with torch.no_grad():
        assert torch.equal(fresh.model(input_ids=ids).logits, plain)


def test_cli_apply_diff_inspect_revert(tokenizer, edits, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    base_dir = tmp_path / "base"
    make_tiny_model(tokenizer).save_pretrained(base_dir)
    out = tmp_path / "edited"
    assert main(["patch", "apply", str(base_dir), str(edits["p1"]), str(edits["p2"]),
                 "--out", str(out)]) == 0
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64)  # no factedit
    got = {n: p.detach() for n, p in plain.named_parameters()}
    assert max_diff(got, edits["after"]) < 1e-6
    provenance = json.loads((out / "factedit-patches.json").read_text())
    assert [p["method"] for p in provenance["patches"]] == ["rome", "rome"]
    # A wrong base: refused, nothing written (not even an empty folder).
    assert main(["patch", "apply", str(out), str(edits["p1"]), "--out",
                 str(tmp_path / "twice")]) == 2
    assert "base fingerprint" in capsys.readouterr().err and not (tmp_path / "twice").exists()
    # A non-empty --out without --force: refused before loading anything.
    assert main(["patch", "apply", str(base_dir), str(edits["p1"]), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["patch", "diff", str(base_dir), str(out), "--out",
                 str(tmp_path / "d.safetensors"), "--dtype", "float64"]) == 0
    diff = Patch.load(tmp_path / "d.safetensors")
    assert sorted(i["rank"] for i in diff.meta["weights"].values()) in ([2], [1, 1])
    capsys.readouterr()
    assert main(["patch", "inspect", str(edits["p1"])]) == 0
    shown = capsys.readouterr().out
    assert "rank 1" in shown and "The Eiffel Tower is located in the city of -> Rome" in shown
    assert main(["patch", "revert", str(out), str(edits["p2"]), "--out",
                 str(tmp_path / "reverted")]) == 0
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "reverted", dtype=torch.float64)
    assert max_diff({n: p.detach() for n, p in back.named_parameters()}, edits["middle"]) < 1e-6


def test_permutation_is_the_inverse_of_transformers_reader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    reader = LlamaTensorProcessor(config={"num_attention_heads": 6, "num_key_value_heads": 2})
    w = torch.randn(6 * 8, 10).numpy()
    k = torch.randn(2 * 8, 10).numpy()
    assert (reader.process(permute_rotary(w, 6, 6), "blk.0.attn_q.weight").weights == w).all()
    assert (reader.process(permute_rotary(k, 6, 2), "blk.0.attn_k.weight").weights == k).all()


def test_run_writes_a_patch_per_method(tokenizer, shared_data, tmp_path):
    from factedit.lab import run_experiment
    from factedit.requests import save_requests

    facts = [fe.EditRequest(**{**r.to_dict(), "case_id": c}) for r, c in
             ((EIFFEL, "eiffel"), (MESSI, "messi"))]
    save_requests(facts, str(tmp_path / "facts.json"))
    config = {"name": "tiny", "dataset": {"name": str(tmp_path / "facts.json")},
              "methods": [{"name": "memit", "config": dict(layers=[1, 2], v_steps=3,
                                                           context_prefixes=0,
                                                           covariance_seq_len=32)}],
              "n_edits": [2], "covariance": {"corpus": str(shared_data / "corpus" /
                                                           "wikitext-2-raw"), "tokens": 256},
              "seed": 0}
    out = run_experiment(config, tmp_path / "run", model=make_tiny_model(tokenizer),
                         progress=False)
    patch = Patch.load(out / "patches" / "memit.safetensors")
    assert patch.method == "memit" and patch.meta["request_ids"] == ["eiffel", "messi"]
    assert sorted(patch.meta["weights"]) == [f"model.layers.{i}.mlp.down_proj.weight"
                                             for i in (1, 2)]
    assert "efficacy" in patch.meta["scores"]
    assert patch.check_base(make_tiny_model(tokenizer))["exact"]


def test_cli_edit_writes_a_patch(tokenizer, shared_data, tmp_path, capsys):
    base_dir = tmp_path / "base"
    make_tiny_model(tokenizer).save_pretrained(base_dir)
    path = tmp_path / "edit.safetensors"
    assert main(["edit", "--model", str(base_dir), "--prompt", EIFFEL.prompt, "--subject",
                 EIFFEL.subject, "--target-new", "Rome", "--target-true", "Paris",
                 "--corpus", str(shared_data / "corpus" / "wikitext-2-raw"),
                 "--covariance-tokens", "512", "--set", "v_steps=3", "--set",
                 "context_prefixes=1", "--set", "covariance_seq_len=32", "--patch", str(path),
                 "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    patch = Patch.load(path)
    assert shown["patch"] == str(path) and patch.meta["requests"][0]["target_new"] == "Rome"
    assert patch.meta["scores"]["efficacy"] == shown["metrics"]["efficacy"]
    assert patch.check_base(fe.load_model(str(base_dir)))["exact"]
