"""Every default of the methods the defaults table covers says where it came from (paper,
sweep, per-model table, engineering), and `factedit info --method M` prints it."""

import dataclasses

import pytest
from conftest import make_tiny_model

import factedit as fe
from factedit.cli import main
from factedit.methods import METHODS
from factedit.methods.config import (
    MODEL_DEFAULTS,
    MODEL_TABLE,
    PAPER,
    SWEEP,
    UNRECORDED,
    default_layers,
    default_sources,
    defaults_with_sources,
    sourced,
)
from factedit.methods.locate.d4s import D4SConfig
from factedit.protocol import make_editor

# The methods of docs/results/defaults: each of their defaults is accounted for.
TABLED = ("rome", "memit", "pmet", "alphaedit", "d4s", "d4s-alphaedit", "ft-l", "ft-m", "grace")


@pytest.mark.parametrize("method", TABLED)
def test_every_default_of_a_tabled_method_has_a_source(method):
    sources = default_sources(METHODS[method].config_cls)
    assert set(sources) == {f.name for f in dataclasses.fields(METHODS[method].config_cls)}
    assert UNRECORDED not in sources.values(), {k: v for k, v in sources.items()
                                                if v == UNRECORDED}


def test_d4s_defaults_name_the_sweep_and_the_table():
    sources = default_sources(D4SConfig)
    assert sources["mom2_update_weight"] == MODEL_TABLE
    assert sources["layers"] == MODEL_TABLE
    assert sources["residual"] == PAPER  # the identity's setting, not the sweep's
    swept = {name for name, source in sources.items() if source == SWEEP}
    assert swept == {"context_prefixes"}, swept
    assert D4SConfig().context_prefixes == 0


def test_a_subclass_that_changes_a_default_without_a_source_is_unrecorded():
    @dataclasses.dataclass
    class Changed(D4SConfig):
        v_steps: int = 7
        v_lr: float = sourced(0.1, "a test")

    sources = default_sources(Changed)
    assert sources["v_steps"] == UNRECORDED
    assert sources["v_lr"] == "a test"
    assert sources["v_weight_decay"] == PAPER  # inherited declarations keep theirs


def test_info_prints_each_default_with_its_source(monkeypatch, capsys, tokenizer):
    tiny = make_tiny_model(tokenizer)
    monkeypatch.setattr(fe, "load_model", lambda *args, **kwargs: tiny)
    assert main(["info", "--method", "d4s"]) == 0
    out = capsys.readouterr().out
    rows = dict(line.strip().split(" = ", 1) for line in out.splitlines()
                if line.startswith("  ") and " = " in line)
    assert set(rows) == {f.name for f in dataclasses.fields(D4SConfig)}
    # the tiny model has no row in the table: the depth rule's layers, named as such
    layers = default_layers(tiny, "memit")
    assert rows["layers"] == f"{layers!r}: {MODEL_TABLE}"
    assert rows["residual"] == f"'once': {PAPER}"
    assert rows["context_prefixes"] == f"0: {SWEEP}"


def test_defaults_with_sources_reads_the_model_table(monkeypatch, tokenizer):
    tiny = make_tiny_model(tokenizer)
    shape = (tiny.model.config.model_type, tiny.num_layers, tiny.model.config.hidden_size)
    monkeypatch.setitem(MODEL_DEFAULTS, shape,
                        {"memit": {"layers": [1, 2], "mom2_update_weight": 123.0},
                         "d4s": {"mom2_update_weight": 7.0}})
    rows = {name: (value, source) for name, value, source
            in defaults_with_sources(tiny, D4SConfig, ("d4s", "memit"))}
    assert rows["mom2_update_weight"] == (7.0, MODEL_TABLE)  # d4s's own row first
    assert rows["layers"] == ([1, 2], MODEL_TABLE)
    assert rows["v_steps"] == (25, PAPER)
    memit_rows = dict((n, v) for n, v, _ in defaults_with_sources(tiny, D4SConfig, ("memit",)))
    assert memit_rows["mom2_update_weight"] == 123.0
    # and the editors use what info prints
    assert make_editor(tiny, "d4s").mom2_weight(1) == 7.0
    assert make_editor(tiny, "memit").mom2_weight(1) == 123.0
    assert make_editor(tiny, "d4s", mom2_update_weight=9.0).mom2_weight(1) == 9.0
    assert make_editor(tiny, "pmet").mom2_weight(1) == 123.0  # no row of its own: MEMIT's
    monkeypatch.setitem(MODEL_DEFAULTS[shape], "pmet", {"mom2_update_weight": 11.0})
    assert make_editor(tiny, "pmet").mom2_weight(1) == 11.0
    assert make_editor(tiny, "memit").mom2_weight(1) == 123.0
