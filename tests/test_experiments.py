"""Every shipped experiment file parses against the schema (fields, methods, tasks)."""

from pathlib import Path

import pytest

from factedit.lab import load_experiment

EXPERIMENTS = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.yaml"))


def test_there_are_shipped_experiments():
    assert len(EXPERIMENTS) >= 5


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_shipped_experiment_is_valid(path):
    experiment = load_experiment(path)
    assert experiment.name == path.stem
    assert experiment.methods and experiment.max_edits >= 20
