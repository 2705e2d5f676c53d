"""FT-L, FT-M and KN on the real built-in SmolLM2-135M: each edit flips the Eiffel Tower to
Rome while the Louvre keeps Paris, alone (single mode) and in a sequence of two facts."""

import pytest

import factedit as fe
from factedit.data import builtin_facts

pytestmark = pytest.mark.slow

EIFFEL = builtin_facts()[0]
LOUVRE = EIFFEL.neighborhood[0][0]


def answer(model, prompt: str) -> str:
    return model.generate(prompt, max_new_tokens=3).strip()


@pytest.mark.parametrize("method", ["ft-m", "ft-l", "kn"])
def test_single_edit_flips_eiffel_keeps_louvre(builtin_model, method):
    model = builtin_model
    assert answer(model, EIFFEL.rewrite_prompt).startswith("Paris")
    handle = fe.edit(model, [EIFFEL], method=method, mode="single",
                     evaluate=lambda m, reqs: {"after": answer(m, EIFFEL.rewrite_prompt),
                                               "louvre": answer(m, LOUVRE)}, progress=False)
    after = handle.records[0].metrics
    assert after["after"].startswith("Rome"), after
    assert after["louvre"].startswith("Paris"), after
    # single mode restores the weights after scoring
    assert answer(model, EIFFEL.rewrite_prompt).startswith("Paris")


# KN is left out of the sequence test: its attribution costs ~30 s per edit on two cores.
@pytest.mark.parametrize("method", ["ft-m"])
def test_sequence_of_two_edits_keeps_both(builtin_model, method):
    model = builtin_model
    second = builtin_facts()[1]
    handle = fe.edit(model, [EIFFEL, second], method=method, mode="sequential", progress=False)
    try:
        scores = fe.evaluate(model, [EIFFEL, second])
        assert scores["efficacy"] == 1.0, scores["per_request"]
        assert answer(model, LOUVRE).startswith("Paris")
    finally:
        handle.restore()
