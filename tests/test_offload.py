"""Editing a model that accelerate spreads over devices and offloads to CPU memory or disk.

A tiny random Llama is saved as a HF folder and loaded twice: in memory, and through
`fe.load_model(folder, device_map=..., offload_folder=...)` with the edited layers on "disk"
(their parameters on `meta`, the values memory-mapped, copied in by accelerate's hooks at
each forward). The same edit must give the same weights and logits on both (float32
tolerance), restore() must bring the original weights back, the model folder on disk must
never change, and a saved D4S run must resume on a freshly loaded offloaded model.
"""

from __future__ import annotations

import pytest
import torch
from conftest import SHARED_DATA, make_tiny_model

import factedit as fe
from factedit import EditRequest
from factedit.models import is_offloaded, read_param, write_param
from factedit.models.loading import file_digest
from factedit.protocol import EditHandle, make_editor

CORPUS = SHARED_DATA / "corpus" / "wikitext-2-raw"
LAYERS = [1, 2]
N_LAYERS = 4
# Layers 0 and 3 stay in memory; the edited layers 1 and 2 are offloaded to disk.
DEVICE_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu",
              "lm_head": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
              "model.layers.2": "disk", "model.layers.3": "cpu"}

REQUESTS = [
    EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower",
                target_new="Rome", target_true="Paris"),
    EditRequest(prompt="{} plays the sport of", subject="Serena Williams",
                target_new="cricket", target_true="tennis"),
    EditRequest(prompt="The mother tongue of {} is", subject="Vladimir Putin",
                target_new="French", target_true="Russian"),
]
PROBE = "The Eiffel Tower is located in the city of"


def small(method: str) -> dict:
    """Config fields for a fast edit of the tiny model by `method`."""
    if method == "ft-l":
        return dict(layers=[1], steps=4)
    if method == "kn":
        return dict(layers=LAYERS, ig_steps=4)
    return dict(layers=[1] if method == "rome" else LAYERS, covariance_corpus=str(CORPUS),
                covariance_tokens=2048, covariance_seq_len=64, v_steps=6,
                context_prefixes=2, context_length=5)


@pytest.fixture(scope="module", autouse=True)
def private_cache(tokenizer, tmp_path_factory):
    """Caches in a temporary folder (tiny models must not meet real ones)."""
    if not CORPUS.is_dir():
        pytest.skip(f"covariance corpus not found at {CORPUS}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FACTEDIT_CACHE", str(tmp_path_factory.mktemp("factedit-cache")))
        yield


@pytest.fixture(scope="module")
def folder(tokenizer, tmp_path_factory):
    """A tiny random float32 Llama saved as a HF folder (safetensors + tokenizer)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny = make_tiny_model(tokenizer, layers=N_LAYERS, dtype=torch.float32)
    tiny.model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def load_offloaded(folder, tmp_path, name="offload"):
    return fe.load_model(str(folder), device_map=DEVICE_MAP, offload_folder=str(tmp_path / name))


def logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(**model.tokenize([PROBE, "Serena Williams plays the sport of"])).logits


def weights(model, layers=range(N_LAYERS)) -> dict[int, torch.Tensor]:
    return {layer: model.weight(layer).clone() for layer in layers}


def assert_close(a: dict, b: dict) -> None:
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_the_edited_layers_are_offloaded(folder, tmp_path):
    model = load_offloaded(folder, tmp_path)
    assert [is_offloaded(model.model, model.weight_name(layer)) for layer in range(N_LAYERS)] == [
        False, True, True, False]
    assert model.mlp_out(1).weight.device.type == "meta"
    assert model.device == torch.device("cpu")
    reference = fe.load_model(str(folder))
    assert_close(weights(model), weights(reference))
    torch.testing.assert_close(logits(model), logits(reference))


def test_write_param_reaches_the_next_forward_and_spares_the_model_folder(folder, tmp_path):
    digest = file_digest(folder / "model.safetensors")
    model, reference = load_offloaded(folder, tmp_path), fe.load_model(str(folder))
    name = model.weight_name(1)
    new = read_param(model.model, name) * 1.5
    write_param(model.model, name, new)
    write_param(reference.model, name, new)
    assert torch.equal(read_param(model.model, name), new)
    torch.testing.assert_close(logits(model), logits(reference))
    assert not torch.allclose(logits(model), logits(fe.load_model(str(folder))))
    assert file_digest(folder / "model.safetensors") == digest
    with pytest.raises(ValueError, match="shape"):
        write_param(model.model, name, new.T)


@pytest.mark.parametrize("method", ["memit", "d4s", "rome", "ft-l", "kn"])
def test_edit_of_offloaded_model_equals_edit_in_memory(folder, tmp_path, method):
    """Same deltas, same logits; restore() puts the original weights back."""
    digest = file_digest(folder / "model.safetensors")
    offloaded, in_memory = load_offloaded(folder, tmp_path), fe.load_model(str(folder))
    before = weights(in_memory)
    mode = "sequential" if method in ("rome", "ft-l", "kn") else "batch"
    # The offloaded model edits first, so it is the one that computes C (the cache is shared).
    handle = fe.edit(offloaded, REQUESTS[:2], method=method, mode=mode, progress=False,
                     **small(method))
    reference = fe.edit(in_memory, REQUESTS[:2], method=method, mode=mode, progress=False,
                        **small(method))
    edited = set(handle.originals)
    assert edited == set(reference.originals) and edited
    assert all(is_offloaded(offloaded.model, name) for name in edited)
    assert_close(weights(offloaded), weights(in_memory))
    changed = [layer for layer in range(N_LAYERS) if not torch.equal(
        offloaded.weight(layer), before[layer])]
    assert changed and {offloaded.weight_name(layer) for layer in changed} == edited
    torch.testing.assert_close(logits(offloaded), logits(in_memory), rtol=1e-5, atol=1e-5)
    assert handle.weight_stats().keys() == edited
    with handle.disabled():
        assert_close(weights(offloaded), before)
    assert not torch.equal(offloaded.weight(changed[0]), before[changed[0]])
    handle.restore()
    assert all(torch.equal(offloaded.weight(layer), before[layer]) for layer in range(N_LAYERS))
    torch.testing.assert_close(logits(offloaded), logits(fe.load_model(str(folder))))
    assert file_digest(folder / "model.safetensors") == digest


def test_covariance_of_offloaded_layers(folder, tmp_path):
    from factedit.linalg import covariance

    offloaded, in_memory = load_offloaded(folder, tmp_path), fe.load_model(str(folder))
    options = dict(corpus=str(CORPUS), n_tokens=1024, seq_len=64, use_cache=False,
                   progress=False)
    a, b = covariance(offloaded, LAYERS, **options), covariance(in_memory, LAYERS, **options)
    assert_close(a, b)


def test_edit_with_every_weight_offloaded_to_cpu_memory(folder):
    """accelerate.cpu_offload: every parameter on meta, the values in a dict in memory."""
    from accelerate import cpu_offload

    offloaded, in_memory = fe.load_model(str(folder)), fe.load_model(str(folder))
    cpu_offload(offloaded.model, execution_device="cpu")
    assert offloaded.mlp_out(1).weight.device.type == "meta"
    handle = fe.edit(offloaded, REQUESTS[:2], method="d4s", mode="sequential",
                     progress=False, **small("d4s"))
    fe.edit(in_memory, REQUESTS[:2], method="d4s", mode="sequential", progress=False,
            **small("d4s"))
    assert_close(weights(offloaded), weights(in_memory))
    torch.testing.assert_close(logits(offloaded), logits(in_memory), rtol=1e-5, atol=1e-5)
    handle.restore()
    assert_close(weights(offloaded), weights(fe.load_model(str(folder))))


def test_d4s_save_and_resume_on_an_offloaded_model(folder, tmp_path):
    """Edit 2, save, resume on a freshly loaded offloaded model, edit 1 more == 3 in memory."""
    first = load_offloaded(folder, tmp_path, "offload-a")
    handle = EditHandle(first, make_editor(first, "d4s", **small("d4s")))
    handle.edit(REQUESTS[:2], mode="sequential", progress=False)
    handle.save(tmp_path / "run")
    second = load_offloaded(folder, tmp_path, "offload-b")
    resumed = EditHandle.resume(second, tmp_path / "run")
    assert_close(weights(second), weights(first))
    resumed.edit(REQUESTS[2:], mode="sequential", progress=False)
    straight = fe.load_model(str(folder))
    fe.edit(straight, REQUESTS, method="d4s", mode="sequential", progress=False, **small("d4s"))
    assert resumed.editor.live_edits == [0, 1, 2]
    # Target values were optimised in batches of 2 + 1 here and of 3 there (prepare): equal
    # up to float32 rounding of the batched forward, so compare the edits by relative size.
    w0 = weights(fe.load_model(str(folder)), LAYERS)
    for layer in LAYERS:
        done, reference = second.weight(layer) - w0[layer], straight.weight(layer) - w0[layer]
        assert reference.norm() > 0
        assert float((done - reference).norm() / reference.norm()) < 1e-3
    resumed.restore()
    assert_close(weights(second), weights(fe.load_model(str(folder))))
