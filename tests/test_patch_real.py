"""A ROME edit of the real built-in model travels: patch file -> plain HF folder -> GGUF.

One test, so the model is edited once and the GGUF file is read back once (that read takes
most of the time: transformers parses the tokenizer fields and dequantizes every tensor).
"""

from __future__ import annotations

import pytest
import torch

import factedit as fe
from factedit.cli import main
from factedit.patch import Patch

pytestmark = pytest.mark.slow

EIFFEL = fe.EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower",
                        target_new="Rome", target_true="Paris")
NEIGHBOUR = "The Louvre is located in the city of"


def greedy(model, tokenizer, prompt: str) -> str:
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:]).strip()


def test_edit_patch_folder_and_gguf(builtin_model, shared_data, tmp_path):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from factedit.patch.gguf import export_gguf, gguf_source

    model = builtin_model
    handle = fe.edit(model, [EIFFEL], method="rome", progress=False,
                     covariance_corpus=str(shared_data / "corpus" / "wikitext-2-raw"),
                     covariance_tokens=20_000)
    try:
        patch = Patch.from_handle(handle, [EIFFEL])
        (name, info), = patch.meta["weights"].items()
        assert info["form"] == "lowrank" and info["rank"] == 1 and info["relative_error"] < 1e-5
        path = patch.save(tmp_path / "eiffel.safetensors")
        assert path.stat().st_size < 20_000  # a 576 x 1536 float32 matrix is 3.5 MB
        # f32 GGUF of the edited model: its tensors are the model's, bit for bit.
        export_gguf(model, tmp_path / "f32.gguf", "f32", base_gguf=gguf_source("smollm2-135m"))
        layer = int(name.split(".")[2])
        tensors = {t.name: t for t in GGUFReader(tmp_path / "f32.gguf").tensors}
        down = torch.from_numpy(tensors[f"blk.{layer}.ffn_down.weight"].data.copy())
        assert torch.equal(down, model.model.get_parameter(name).detach())
        config = model.model.config
        query = LlamaTensorProcessor(config=config.to_dict()).process(
            tensors[f"blk.{layer}.attn_q.weight"].data.copy(), f"blk.{layer}.attn_q.weight")
        assert torch.equal(torch.from_numpy(query.weights),
                           model.model.model.layers[layer].self_attn.q_proj.weight.detach())
    finally:
        handle.restore()

    folder = tmp_path / "edited"
    assert main(["patch", "apply", "smollm2-135m", str(path), "--out", str(folder)]) == 0
    tokenizer = AutoTokenizer.from_pretrained(folder)
    plain = AutoModelForCausalLM.from_pretrained(folder)  # transformers alone, no factedit
    assert greedy(plain, tokenizer, EIFFEL.rewrite_prompt).startswith("Rome")
    assert greedy(plain, tokenizer, NEIGHBOUR).startswith("Paris")

    assert main(["export", "gguf", str(folder), "--out", str(tmp_path / "q8.gguf"),
                 "--type", "q8_0"]) == 0
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q8.gguf")
    assert greedy(quantized, tokenizer, EIFFEL.rewrite_prompt).startswith("Rome")
    assert greedy(quantized, tokenizer, NEIGHBOUR).startswith("Paris")
