"""FT-L, FT-M and KN on the real built-in SmolLM2-135M: each edit flips the Eiffel Tower to
Rome while the Louvre keeps Paris, alone (single mode) and in a sequence of two facts."""

import pytest
from conftest import answer

import factedit as fe
from factedit.data import builtin_facts

pytestmark = pytest.mark.slow

EIFFEL = builtin_facts()[0]
LOUVRE = EIFFEL.neighborhood[0][0]


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


# Editors that keep the weights: the edit acts through hooks (or context), so removing it
# must give the unedited answers back, and generate must see it. The in-context editors
# cannot move SmolLM2-135M off Paris for the Eiffel Tower (the context about the tower makes
# "Paris" likelier still); measured on the 39 built-in facts they flip 13-17, so they are
# tested on the second fact, which all three flip.
@pytest.mark.parametrize(("method", "fact"), [("t-patcher", 0), ("calinet", 0), ("grace", 0),
                                              ("serac", 1), ("memprompt", 1), ("ike", 1)])
def test_weight_keeping_editor_flips_keeps_and_removes(builtin_model, method, fact):
    model = builtin_model
    request = builtin_facts()[fact]
    neighbour, neighbour_answer = request.neighborhood[0]
    original = answer(model, request.rewrite_prompt)
    assert original.startswith(request.target_true), original
    before = model.model.state_dict()["lm_head.weight"].clone()
    handle = fe.edit(model, [request], method=method, mode="sequential", progress=False)
    try:
        assert answer(model, request.rewrite_prompt).startswith(request.target_new)
        assert answer(model, neighbour).startswith(neighbour_answer)
        handle.remove(0)
        assert answer(model, request.rewrite_prompt) == original
    finally:
        handle.restore()
    assert model.model.state_dict()["lm_head.weight"].equal(before)
