"""KE and MEND on the real built-in SmolLM2-135M: each network, trained for 30 steps (~14 s
of CPU each) on the CounterFact train split with its method's defaults, flips the Eiffel
Tower to Rome, alone and in a sequence of two facts (efficacy 1.0), and restores it.

30 steps, not the 60 this test first trained, halve the set-up with the same assertions:
measured on 2026-12-07, both networks flip the fact alone and keep both sequential edits
after 30 steps as after 60 (and after 15, the margin below this setting)."""

from pathlib import Path

import pytest
from conftest import answer

import factedit as fe
from factedit.data import builtin_facts, load_dataset
from factedit.methods import KeConfig, MendConfig
from factedit.methods.hypernet.ke import train_ke
from factedit.methods.hypernet.mend import train_mend

pytestmark = pytest.mark.slow

EIFFEL = builtin_facts()[0]
TRAINERS = {"ke": (KeConfig, train_ke), "mend": (MendConfig, train_mend)}
TRAIN_STEPS = 30


@pytest.fixture(scope="module", params=sorted(TRAINERS))
def trained_net(request, builtin_model, shared_data, tmp_path_factory) -> tuple[str, Path]:
    kind = request.param
    config_cls, train = TRAINERS[kind]
    examples = load_dataset("counterfact-train", limit=200, data_dir=shared_data)
    out = tmp_path_factory.mktemp(kind)
    config = config_cls(train={"steps": TRAIN_STEPS, "batch_size": 1, "validate_every": 1000,
                               "keep_best": False})
    train(builtin_model, examples, [], out, config, progress=False)
    return kind, out


def test_trained_hypernet_flips_one_fact_and_restores(builtin_model, trained_net):
    model = builtin_model
    kind, net = trained_net
    assert answer(model, EIFFEL.rewrite_prompt).startswith("Paris")
    handle = fe.edit(model, [EIFFEL], method=kind, mode="single", checkpoint=str(net),
                     evaluate=lambda m, reqs: {"after": answer(m, EIFFEL.rewrite_prompt)},
                     progress=False)
    assert handle.records[0].metrics["after"].startswith("Rome"), handle.records[0].metrics
    assert answer(model, EIFFEL.rewrite_prompt).startswith("Paris")  # single mode restores


def test_trained_hypernet_keeps_two_sequential_edits(builtin_model, trained_net):
    model = builtin_model
    kind, net = trained_net
    second = builtin_facts()[1]
    handle = fe.edit(model, [EIFFEL, second], method=kind, mode="sequential",
                     checkpoint=str(net), progress=False)
    try:
        scores = fe.evaluate(model, [EIFFEL, second])
        assert scores["efficacy"] == 1.0, scores["per_request"]
    finally:
        handle.restore()
    assert answer(model, EIFFEL.rewrite_prompt).startswith("Paris")
