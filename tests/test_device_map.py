"""A model bigger than its memory budget: `device_map="auto"` with `max_memory` splits it.

The documented path for big models (docs/big-models.md) is
`fe.load_model(folder, device_map="auto", max_memory=..., offload_folder=...)`: accelerate
fills the budget in order and spills the rest to disk. Here a tiny saved Llama gets a CPU
budget of about half its size, so the first layers stay in memory and the later ones live
on disk (parameters on `meta`, values memory-mapped, copied in by hooks at each forward).
One MEMIT batch edits a layer on each side of the split; the weights and logits must equal
the same edit of the model held in memory, `read_param` must see the edit on both sides,
restore() must bring back every original value bit for bit, and the model folder on disk
must never change. (tests/test_offload.py covers hand-written maps, CPU-memory offload,
every method family and resume.)
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_tokenizer
from helpers import make_family_model

import factedit as fe
from factedit import EditRequest
from factedit.models import is_offloaded, param_device, read_param
from factedit.models.loading import file_digest

REQUESTS = [
    EditRequest(prompt="The mother tongue of {}", subject="Vladimir Putin",
                target_new="French", target_true="Russian"),
    EditRequest(prompt="The sport of {}", subject="Serena Williams",
                target_new="golf", target_true="tennis"),
]
N_LAYERS = 4
SMALL = dict(covariance_tokens=512, covariance_seq_len=32, v_steps=6, context_prefixes=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(folder, budget): a tiny random float32 Llama saved as a HF folder, and a CPU memory
    budget (bytes) that holds its embeddings and about half its layers."""
    tokenizer = tiny_tokenizer()
    tiny = make_family_model(tokenizer, "llama", layers=N_LAYERS, hidden=64,
                             dtype=torch.float32)
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny.model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    corpus = folder.parent / "corpus.txt"
    corpus.write_text(" ".join(f"The city of {a} speaks {b} and plays {c}." for a in (
        "Paris", "Rome", "Berlin", "Madrid") for b in ("French", "German", "Spanish")
        for c in ("tennis", "golf", "football")))
    total = sum(p.numel() * p.element_size() for p in tiny.model.parameters())
    return folder, int(0.8 * total), str(corpus)


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FACTEDIT_CACHE", str(tmp_path_factory.mktemp("factedit-cache")))
        yield


def logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(**model.tokenize([r.rewrite_prompt for r in REQUESTS])).logits


def test_memit_across_the_memory_disk_split(saved, tmp_path):
    folder, budget, corpus = saved
    digest = file_digest(folder / "model.safetensors")
    big = fe.load_model(str(folder), device_map="auto", max_memory={"cpu": budget},
                        offload_folder=str(tmp_path / "offload"))
    in_memory = fe.load_model(str(folder))
    placement = big.model.hf_device_map
    on_disk = [is_offloaded(big.model, big.weight_name(i)) for i in range(N_LAYERS)]
    # Memory first, then disk: a budget of 80% of the weights leaves some layers on each.
    assert on_disk == sorted(on_disk) and any(on_disk) and not all(on_disk), placement
    split = on_disk.index(True)
    layers = [split - 1, split]  # the last layer in memory, the first on disk
    assert big.mlp_out(split).weight.device.type == "meta"
    assert param_device(big.model, big.weight_name(split)) == torch.device("cpu")
    originals = {name: read_param(big.model, name).clone()
                 for name in (big.weight_name(i) for i in range(N_LAYERS))}
    torch.testing.assert_close(logits(big), logits(in_memory))

    options = dict(SMALL, layers=layers, covariance_corpus=corpus)
    handle = fe.edit(big, REQUESTS, method="memit", mode="batch", progress=False, **options)
    fe.edit(in_memory, REQUESTS, method="memit", mode="batch", progress=False, **options)
    assert set(handle.originals) == {big.weight_name(i) for i in layers}
    for i in range(N_LAYERS):
        name = big.weight_name(i)
        torch.testing.assert_close(read_param(big.model, name),
                                   read_param(in_memory.model, name), rtol=1e-5, atol=1e-6)
        assert torch.equal(read_param(big.model, name), originals[name]) is (i not in layers)
    # The next forward reads the edited values from memory and from the offload folder.
    torch.testing.assert_close(logits(big), logits(in_memory), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(big), logits(fe.load_model(str(folder))))

    handle.restore()
    for name, value in originals.items():
        assert torch.equal(read_param(big.model, name), value), name
    torch.testing.assert_close(logits(big), logits(fe.load_model(str(folder))))
    assert file_digest(folder / "model.safetensors") == digest
