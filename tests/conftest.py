"""Shared fixtures: the real built-in model (behaviour) and tiny random models (algebra)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FACTEDIT_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (or $FACTEDIT_DATA); tests that need it skip with a reason if absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"benchmark data not found at {SHARED_DATA} (set FACTEDIT_DATA)")
    return SHARED_DATA


def answer(model, prompt: str) -> str:
    """The model's greedy 3-token continuation of `prompt`, stripped (what an edit flips)."""
    return model.generate(prompt, max_new_tokens=3).strip()


@pytest.fixture(scope="session")
def builtin_model():
    """The real SmolLM2-135M, loaded once per session. Tests must restore what they edit."""
    import factedit as fe

    return fe.load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer(builtin_model):
    return builtin_model.tokenizer


def make_tiny_model(tokenizer, model_type: str = "llama", layers: int = 4, hidden: int = 64,
                    seed: int = 0, dtype=torch.float64):
    """A randomly initialised model of `model_type` with the built-in tokenizer's vocabulary."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    from factedit.models import resolve_arch
    from factedit.models.editable import EditableModel

    torch.manual_seed(seed)
    vocab = len(tokenizer)
    if model_type == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=256,
                             tie_word_embeddings=True)
    elif model_type == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4,
                            n_positions=256)
    elif model_type == "gemma3":
        from transformers import Gemma3TextConfig

        # A 4-token sliding window: shorter than the test prompts, so the local layers'
        # masks differ from the global ones.
        config = Gemma3TextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                  num_hidden_layers=layers, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=hidden // 4, sliding_window=4,
                                  max_position_embeddings=256)
    else:
        raise ValueError(model_type)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    return EditableModel(model, tokenizer, resolve_arch(model.config), f"tiny-{model_type}-{layers}x{hidden}-s{seed}")


@pytest.fixture
def tiny_model(tokenizer):
    """A fresh 4-layer random Llama in float64 (exact identities need float64)."""
    return make_tiny_model(tokenizer)
