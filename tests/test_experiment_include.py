"""`include:` in experiment files: the batch-size study's variants state only what differs,
and each resolves to exactly the config its standalone file had (snapshot taken from the
files before they included a base)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from factedit.lab import ExperimentError, load_experiment
from factedit.lab.config import read_experiment_file, resolve_includes

ROOT = Path(__file__).resolve().parents[1]
BEFORE = json.loads((Path(__file__).parent / "data" / "experiments-before-include.json")
                   .read_text())


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_batch_size_file_resolves_to_its_former_config(name):
    path = ROOT / "experiments" / name
    assert "include" in read_experiment_file(path)
    assert resolve_includes(read_experiment_file(path), path) == BEFORE[name]
    assert load_experiment(path).name == path.stem


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_including_file_overrides_and_dicts_merge_deeply(tmp_path):
    write(tmp_path / "common" / "base.yaml",
          "a: 1\nlist: [1, 2]\nsection: {x: 1, inner: {y: 2, z: 3}}\n")
    child = write(tmp_path / "child.yaml", "include: common/base.yaml\nlist: [3]\n"
                  "section: {inner: {z: 4}}\nb: 2\n")
    assert resolve_includes(read_experiment_file(child), child) == {
        "a": 1, "b": 2, "list": [3], "section": {"x": 1, "inner": {"y": 2, "z": 4}}}


def test_include_paths_are_relative_to_the_including_file(tmp_path):
    write(tmp_path / "a" / "b" / "leaf.yaml", "x: 1\n")
    write(tmp_path / "a" / "mid.yaml", "include: b/leaf.yaml\ny: 2\n")
    top = write(tmp_path / "top.yaml", "include: [a/mid.yaml]\nz: 3\n")
    assert resolve_includes(read_experiment_file(top), top) == {"x": 1, "y": 2, "z": 3}


def test_a_cycle_is_refused_naming_it(tmp_path):
    write(tmp_path / "one.yaml", "include: two.yaml\n")
    write(tmp_path / "two.yaml", "include: one.yaml\n")
    with pytest.raises(ExperimentError, match=r"cycle \(one.yaml -> two.yaml -> one.yaml\)"):
        load_experiment(tmp_path / "one.yaml")


def test_a_missing_include_names_the_path(tmp_path):
    path = write(tmp_path / "x.yaml", "include: nowhere.yaml\n")
    with pytest.raises(ExperimentError, match="nowhere.yaml: no file"):
        load_experiment(path)
