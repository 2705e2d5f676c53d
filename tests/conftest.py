"""Shared fixtures: the real built-in model (behaviour) and tiny random models (algebra).

The tiny models carry their own small byte-level BPE tokenizer, trained in memory on a fixed
text, so every test not marked `slow` runs without the built-in model. Two guards keep it so:
a test that asks for `builtin_model` without the `slow` mark is a collection error, and with
FACTEDIT_TEST_NO_BUILTIN=1 (set by `make test-fast`) loading any built-in alias raises.
"""

from __future__ import annotations

import os
import re
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


NO_BUILTIN = os.environ.get("FACTEDIT_TEST_NO_BUILTIN") == "1"


def _refuse_builtin(alias: str):
    def refuse():
        raise RuntimeError(
            f"FACTEDIT_TEST_NO_BUILTIN=1 (make test-fast) but a test loads the built-in model "
            f"{alias!r}: mark that test @pytest.mark.slow or use make_tiny_model"
        )
    return refuse


if NO_BUILTIN:
    from factedit.models import BUILTIN_MODELS

    for _alias in list(BUILTIN_MODELS):
        BUILTIN_MODELS[_alias] = _refuse_builtin(_alias)


def pytest_collection_modifyitems(config, items):
    """A test that uses the real model (directly or through another fixture) must be `slow`;
    a test file imports shared helpers from conftest or common.py, never from another test
    file (pytest would import that file twice, under two names)."""
    unmarked = [item.nodeid for item in items
                if "builtin_model" in getattr(item, "fixturenames", ())
                and item.get_closest_marker("slow") is None]
    if unmarked:
        raise pytest.UsageError("tests use builtin_model without @pytest.mark.slow: "
                                + ", ".join(unmarked))
    crossing = [f"{path.name}:{n}" for path in sorted(Path(__file__).parent.glob("test_*.py"))
                for n, line in enumerate(path.read_text().splitlines(), 1)
                if re.match(r"\s*(from|import)\s+(tests\.)?test_\w+", line)]
    if crossing:
        raise pytest.UsageError("test files import from other test files (move the shared "
                                "names to tests/common.py): " + ", ".join(crossing))


@pytest.fixture(scope="session")
def builtin_model():
    """The real SmolLM2-135M, loaded once per session. Tests must restore what they edit."""
    import factedit as fe

    return fe.load_model("smollm2-135m")


# A few hundred words of fixed English: the tiny tokenizer's merges come from it, so the
# words the tests' facts use are whole tokens (" Paris", " Rome", " tennis"); any other text
# still encodes, byte by byte. Each line is trained on alone, so a line's first word is also
# learnt without its leading space ("Paris" as a one-token prompt).
TINY_TOKENIZER_TEXT = """\
The Eiffel Tower is located in the city of Paris, the capital of France.
The Louvre is in Paris too, and the Louvre pyramid was designed by an architect.
The Colosseum was built by the Romans in Rome, the capital of Italy. Rome is old.
Big Ben rings in London, the capital of the United Kingdom, where people speak English.
Berlin is the capital of Germany and people there speak German.
Madrid is the capital of Spain and people there speak Spanish.
Moscow is the capital of Russia; the mother tongue of Vladimir Putin is Russian.
Tokyo is the capital of Japan. Toyota is a company from Toyota City.
Microsoft makes Windows and Apple makes the iPhone and the Macintosh.
Lionel Messi plays football and Serena Williams plays tennis.
Roger Federer plays tennis and Rafael Nadal plays tennis too.
Some people play golf or cricket or basketball.
Hey Jude was performed by The Beatles. Madonna is a singer.
Narendra Modi leads India, where people speak Hindi.
Don Quixote was written in the language of Spain.
Arabic is spoken in Egypt and Cairo is its capital.
Tower Bridge crosses the river Thames.
The director of a film is a person.
The name of the father of a child is a name, and the name of the mother is a name too.
My favourite breakfast is bread with milk and tea.
A fact is true or false. True or False?
The official language of a country is the language its people speak.
Where is the tower located? It stands in the city.
The company is a product of its workers.
A river runs through the city of Milan in Italy.
The sport of tennis is played with a ball.
Who was born in the year one thousand? The answer is no one we know.
He was the first king of the country and she was the first queen.
They wrote books, songs and plays in many languages: French, German, Italian, Spanish,
English, Russian, Arabic, Japanese and Chinese.
The United States of America has fifty states.
Paris
Rome
London
Berlin
Madonna
"""

# ChatML, as SmolLM2-Instruct's template (multi-hop questions go through a chat template
# where a tokenizer has one).
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained in memory on TINY_TOKENIZER_TEXT (deterministic).

    Like SmolLM2's: no BOS, "<|endoftext|>" (id 0) as EOS and padding, ChatML's
    "<|im_start|>"/"<|im_end|>" and chat template, a leading space belongs to the word after
    it. Byte-level, so no text is ever out of vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(TINY_TOKENIZER_TEXT.splitlines(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>")
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    """The tiny models' tokenizer (tiny_tokenizer()): no built-in model needed."""
    return tiny_tokenizer()


def make_tiny_model(tokenizer=None, model_type: str = "llama", layers: int = 4, hidden: int = 64,
                    seed: int = 0, dtype=torch.float64):
    """A randomly initialised model of `model_type` over `tokenizer`'s vocabulary
    (default: a fresh tiny_tokenizer())."""
    from helpers import tiny_config
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    from factedit.models import resolve_arch
    from factedit.models.editable import EditableModel

    if tokenizer is None:
        tokenizer = tiny_tokenizer()
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
    else:  # every other family of tests/helpers.py (phi3, olmo2, qwen3, gpt_neox, ...)
        config = tiny_config(model_type, vocab, layers, hidden, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    return EditableModel(model, tokenizer, resolve_arch(model.config), f"tiny-{model_type}-{layers}x{hidden}-s{seed}")


@pytest.fixture
def lab_env(tmp_path, monkeypatch):
    """A tiny corpus and dataset (common.LAB_FACTS) in tmp_path; caches there too (nothing
    shared is touched). Returns (tmp_path, corpus path, dataset path)."""
    import json

    from common import LAB_FACTS, LAB_TEXT

    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(LAB_TEXT * 12)
    dataset = tmp_path / "facts.json"
    dataset.write_text(json.dumps([f.to_dict() for f in LAB_FACTS]))
    return tmp_path, corpus, dataset


@pytest.fixture
def tiny_model(tokenizer):
    """A fresh 4-layer random Llama in float64 (exact identities need float64)."""
    return make_tiny_model(tokenizer)
