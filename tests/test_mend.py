"""MEND and the shared hypernetwork code on tiny random float64 models: the gradient pieces
are the true weight gradient, an untrained MEND is a fine-tuning step, training lowers the
loss and resumes exactly, editing loads the trained network."""

from __future__ import annotations

import pytest
import torch
from common import HYPERNET_REQUESTS as REQUESTS
from conftest import make_tiny_model

import factedit as fe
from factedit.methods import ConfigError, MendConfig
from factedit.methods.hypernet import EditedForward
from factedit.methods.hypernet.mend import MendEditor, train_mend
from factedit.models.scoring import token_rows
from factedit.protocol import edit_success

TRAIN = {"steps": 6, "batch_size": 2, "lr": 1e-3, "checkpoint_every": 3, "validate_every": 6}


def small_config(**train):
    return MendConfig(layers=[2, 3], rank=8, train=dict(TRAIN, **train))


def test_layer_gradients_are_the_weight_gradient(tokenizer):
    model = make_tiny_model(tokenizer)
    rows = token_rows(model, [(r.rewrite_prompt, r.target_new) for r in REQUESTS[:2]])
    fwd = EditedForward(model, [2, 3])
    pieces = fwd.layer_gradients(rows, fwd.block_input(rows))
    weights = [model.mlp_out(layer).weight for layer in (2, 3)]
    for w in weights:
        w.requires_grad_(True)
    hidden = model.model.base_model(input_ids=rows.ids, attention_mask=rows.mask).last_hidden_state
    loss = fwd.nll(hidden, rows) * rows.n_rows
    grads = torch.autograd.grad(loss, weights)
    for layer, grad in zip((2, 3), grads):
        u, g = pieces[layer]
        assert torch.allclose(g.T @ u, grad, rtol=1e-8, atol=1e-12), layer


def test_block_inputs_of_several_row_sets_equal_each_alone(tokenizer):
    """One padded pass for the edit, equivalence and locality rows (different widths) gives
    each set exactly what its own pass gives: right padding is invisible to real positions."""
    model = make_tiny_model(tokenizer)
    fwd = EditedForward(model, [2, 3])
    short = token_rows(model, [("The capital of Japan is", "Tokyo")])
    long = token_rows(model, [(r.paraphrases[0], r.target_new) for r in REQUESTS[:3]])
    assert short.ids.shape[1] < long.ids.shape[1]
    together = fwd.block_inputs(long, short)
    for rows, got in zip((long, short), together):
        alone = fwd.block_input(rows)
        assert got.shape == alone.shape
        real = rows.mask.bool()
        assert torch.allclose(got[real], alone[real], rtol=1e-10, atol=1e-12)


def test_untrained_mend_is_one_fine_tuning_step(tokenizer):
    model = make_tiny_model(tokenizer)
    net = MendEditor.build_net(model, [2, 3], {"rank": 8, "n_hidden": 1,
                                               "edit_lr_init": 1e-3}).double()
    net.normalised.fill_(1.0)  # mean 0, std 1: no normalisation
    editor = MendEditor(model, MendConfig(layers=[2, 3]), net=net)
    rows = token_rows(model, [(REQUESTS[0].rewrite_prompt, REQUESTS[0].target_new)])
    deltas = editor.deltas_for(rows)
    pieces = editor.forward.layer_gradients(rows, editor.forward.block_input(rows))
    for layer in (2, 3):
        u, g = pieces[layer]
        assert torch.allclose(deltas[layer], -1e-3 * g.T @ u)


def test_training_moves_the_network_and_resumes_exactly(tokenizer, tmp_path):
    model = make_tiny_model(tokenizer, dtype=torch.float32)
    full = train_mend(model, REQUESTS, REQUESTS[:2], tmp_path / "full", small_config(),
                      progress=False, edit_success=edit_success)
    assert len(full["history"]) == 1 and "val_edit_success" in full["history"][0]
    # Interrupted after 3 steps (the checkpoint), then resumed to 6.
    train_mend(model, REQUESTS, [], tmp_path / "split", small_config(steps=3), progress=False)
    train_mend(model, REQUESTS, [], tmp_path / "split", small_config(), progress=False)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "hypernet.safetensors"))
    b = load_file(str(tmp_path / "split" / "hypernet.safetensors"))
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if k.startswith("up."))


@pytest.mark.parametrize(("lr_lr", "bound"), [(None, 5e-5), (1e-3, 1e-3)])
def test_edit_step_sizes_train_at_their_own_rate(tokenizer, tmp_path, lr_lr, bound):
    """Adam moves a parameter by ~lr a step: the step sizes (1e-4 here) get lr_lr (default
    half their start), not the network's lr 1e-3 that would throw them to 10-60x."""
    model = make_tiny_model(tokenizer, dtype=torch.float32)
    config = MendConfig(layers=[2, 3], rank=8, edit_lr_init=1e-4,
                        train=dict(TRAIN, lr_lr=lr_lr, validate_every=100))
    train_mend(model, REQUESTS, [], tmp_path / "net", config, progress=False)
    from safetensors.torch import load_file

    moved = (load_file(str(tmp_path / "net" / "hypernet.safetensors"))["edit_lr"] - 1e-4).abs()
    steps = TRAIN["steps"]
    assert moved.max() <= 3 * steps * bound  # Adam's step is at most a few lr
    assert moved.max() >= 0.3 * bound  # and they do train


def test_edit_loads_the_trained_network(tokenizer, tmp_path):
    model = make_tiny_model(tokenizer, dtype=torch.float32)
    train_mend(model, REQUESTS, [], tmp_path / "net", small_config(steps=2), progress=False)
    before = model.weight(3).clone()
    handle = fe.edit(model, REQUESTS[:1], method="mend", checkpoint=str(tmp_path / "net"),
                     progress=False)
    assert not torch.equal(model.weight(3), before)
    assert set(handle.originals) == {"model.layers.2.mlp.down_proj.weight",
                                     "model.layers.3.mlp.down_proj.weight"}
    handle.restore()
    assert torch.equal(model.weight(3), before)


def test_missing_or_foreign_checkpoint_is_explained(tokenizer, tmp_path):
    model = make_tiny_model(tokenizer)
    with pytest.raises(ConfigError, match="checkpoint"):
        fe.edit(model, REQUESTS[:1], method="mend")
    with pytest.raises(FileNotFoundError, match="factedit train mend"):
        fe.edit(model, REQUESTS[:1], method="mend", checkpoint=str(tmp_path))
    with pytest.raises(ConfigError, match="train"):
        MendConfig(train={"stepz": 3})


def test_train_command_keeps_mends_defaults_unless_a_flag_overrides_them():
    from factedit.cli import _train_config, build_parser

    def config(*flags):
        return _train_config(MendConfig, build_parser().parse_args(
            ["train", "mend", "--out", "nets/mend", *flags]))

    assert config("--steps", "5").train == {"batch_size": 1, "steps": 5}
    assert config().edit_lr_init == 1e-6
    assert config("--batch-size", "4").train == {"batch_size": 4}
    tuned = config("--set", "edit_lr_init=1e-5", "--lr-lr", "1e-7")
    assert tuned.edit_lr_init == 1e-5 and tuned.train["lr_lr"] == 1e-7


def test_training_keeps_the_network_with_the_best_validation(tmp_path):
    """Validation success 0.5, 0.9, 0.7 at steps 2, 4, 6: the saved network is step 4's, and
    a restart does not inherit it."""
    from safetensors.torch import load_file

    from factedit.methods.hypernet import TrainConfig, train_hypernetwork

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    scores = iter([0.5, 0.9, 0.7])

    def step_loss(batch):
        return {"loss": (net(torch.ones(1, 3)) - 5.0).pow(2).sum()}

    config = TrainConfig(steps=6, lr=0.1, batch_size=1, validate_every=2, checkpoint_every=2)
    snapshots = {}

    def validate_and_snapshot():
        snapshots[len(snapshots) + 1] = {k: v.clone() for k, v in net.state_dict().items()}
        return {"edit_success": next(scores)}

    result = train_hypernetwork(net, step_loss, [None] * 4, tmp_path, config, {},
                                validate_and_snapshot, progress=False)
    assert result["selected_step"] == 4
    saved = load_file(str(tmp_path / "hypernet.safetensors"))
    assert all(torch.equal(saved[k], snapshots[2][k]) for k in saved)
    assert not torch.equal(saved["weight"], snapshots[3]["weight"])

    again = train_hypernetwork(torch.nn.Linear(3, 1), step_loss, [None] * 4, tmp_path,
                               TrainConfig(steps=2, lr=0.1, batch_size=1, validate_every=10),
                               {}, None, resume=False, progress=False)
    assert again["selected_step"] == 2 and not (tmp_path / "best.json").exists()
