"""The registry carries each method's facts (training, batch, remove, state size), and the
CLI reads them instead of naming methods."""

from __future__ import annotations

import pytest
from conftest import make_tiny_model

from factedit.cli import main
from factedit.methods import METHODS, Editor, get_method, list_methods, trainable_methods


def test_trainable_methods_are_what_registered_a_trainer():
    assert trainable_methods() == ["ke", "mend", "serac"]
    assert get_method("serac").trainer.needs_model is False
    assert get_method("mend").trainer.output_field == "checkpoint"
    assert get_method("serac").trainer.output_field == "classifier"


def test_batch_and_remove_support_are_read_off_the_editor():
    for name in list_methods():
        spec = METHODS[name]
        assert spec.supports_batch == spec.editor_cls.supports_batch, name
        assert spec.supports_remove == (spec.editor_cls.remove is not Editor.remove), name
    assert get_method("d4s").supports_remove and not get_method("memit").supports_remove
    assert not get_method("rome").supports_batch


def test_state_size_of_the_history_methods(tokenizer):
    model = make_tiny_model(tokenizer, layers=4, hidden=64)
    d_out, d_in = model.weight(0).shape
    for name in ("d4s", "d4s-alphaedit"):
        spec = get_method(name)
        size = spec.state_size(model, spec.config_cls(layers=[1, 2]))
        assert size.layers == 2
        assert size.per_layer == 8 * (2 * d_out * d_in + 2 * d_in * d_in)
        assert size.total == 2 * size.per_layer
    assert get_method("rome").state_size is None


def test_train_command_lists_and_refuses_from_the_registry(capsys):
    assert main(["train"]) == 0
    listed = capsys.readouterr().out
    assert [line.split()[0] for line in listed.splitlines()] == trainable_methods()
    assert main(["train", "rome", "--out", "nowhere"]) == 2
    assert "has nothing to train" in capsys.readouterr().err
    assert main(["train", "serac", "--set", "stepz=3", "--out", "nowhere"]) == 2
    assert "ScopeTrainConfig has no such setting" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["train", "mend"]])
def test_train_needs_out_with_a_name(argv, capsys):
    assert main(argv) == 2
    assert "--out" in capsys.readouterr().err


def test_configs_saved_with_retired_fields_still_load():
    """`extra` (every locate config) and d4s-alphaedit's `mom2_update_weight` never had an
    effect and are gone; saved configs hold them as {} and null."""
    from factedit.methods import ConfigError, D4SAlphaEditConfig, MemitConfig

    saved = {**D4SAlphaEditConfig(alpha=5.0).to_dict(), "extra": {}, "mom2_update_weight": None}
    assert D4SAlphaEditConfig.from_dict(saved) == D4SAlphaEditConfig(alpha=5.0)
    assert MemitConfig.from_dict({"extra": {}, "mom2_update_weight": 5000}).mom2_update_weight == 5000
    with pytest.raises(ConfigError, match="mom2_update_weight.*no longer exists"):
        D4SAlphaEditConfig.from_dict({"mom2_update_weight": 3.0})
    with pytest.raises(ConfigError, match="extra"):
        MemitConfig.from_dict({"extra": {"x": 1}})
