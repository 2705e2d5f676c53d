"""KE on the real built-in SmolLM2-135M: a network trained for 60 steps (~30 s on two cores)
on the CounterFact train split flips the Eiffel Tower to Rome, alone and in a sequence of
two facts. (MEND needs ~250 steps to get there from its 1e-6 step size: bench/RESULTS.md.)"""

from pathlib import Path

import pytest
from conftest import answer

import factedit as fe
from factedit.data import builtin_facts, load_dataset
from factedit.methods import KeConfig
from factedit.methods.ke import train_ke

pytestmark = pytest.mark.slow

EIFFEL = builtin_facts()[0]


@pytest.fixture(scope="module")
def ke_net(builtin_model, shared_data, tmp_path_factory) -> Path:
    train = load_dataset("counterfact-train", limit=200, data_dir=shared_data)
    out = tmp_path_factory.mktemp("ke")
    config = KeConfig(train={"steps": 60, "batch_size": 1, "validate_every": 1000,
                             "keep_best": False})
    train_ke(builtin_model, train, [], out, config, progress=False)
    return out


def test_trained_ke_flips_one_fact_and_restores(builtin_model, ke_net):
    model = builtin_model
    assert answer(model, EIFFEL.rewrite_prompt).startswith("Paris")
    handle = fe.edit(model, [EIFFEL], method="ke", mode="single", checkpoint=str(ke_net),
                     evaluate=lambda m, reqs: {"after": answer(m, EIFFEL.rewrite_prompt)},
                     progress=False)
    assert handle.records[0].metrics["after"].startswith("Rome"), handle.records[0].metrics
    assert answer(model, EIFFEL.rewrite_prompt).startswith("Paris")  # single mode restores


def test_trained_ke_keeps_two_sequential_edits(builtin_model, ke_net):
    model = builtin_model
    second = builtin_facts()[1]
    handle = fe.edit(model, [EIFFEL, second], method="ke", mode="sequential",
                     checkpoint=str(ke_net), progress=False)
    try:
        scores = fe.evaluate(model, [EIFFEL, second])
        assert scores["efficacy"] == 1.0, scores["per_request"]
    finally:
        handle.restore()
    assert answer(model, EIFFEL.rewrite_prompt).startswith("Paris")
