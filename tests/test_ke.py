"""KE on tiny random models: an untrained KE is one fine-tuning step, its per-token mask
equals the paper's elementwise mask on the summed gradient, the Lagrange multiplier moves
the right way, training resumes exactly and editing loads the trained network."""

from __future__ import annotations

import pytest
import torch
from common import HYPERNET_REQUESTS as REQUESTS
from conftest import make_tiny_model

import factedit as fe
from factedit.methods import ConfigError, KeConfig
from factedit.methods.hypernet import TrainConfig
from factedit.methods.hypernet.ke import KeEditor, train_ke
from factedit.models.scoring import token_rows
from factedit.protocol import edit_success

TRAIN = {"steps": 6, "batch_size": 2, "lr": 1e-3, "checkpoint_every": 3, "validate_every": 6}


def small_config(**train):
    return KeConfig(layers=[2, 3], hidden=8, train=dict(TRAIN, **train))


def editor_with_net(model, **settings):
    net = KeEditor.build_net(model, [2, 3], {"hidden": 8, "edit_lr_init": 1e-3, **settings})
    return KeEditor(model, KeConfig(layers=[2, 3]), net=net.double())


def test_untrained_ke_is_one_fine_tuning_step(tokenizer):
    model = make_tiny_model(tokenizer)
    editor = editor_with_net(model)
    rows = token_rows(model, [(r.rewrite_prompt, r.target_new) for r in REQUESTS[:2]])
    deltas = editor.deltas_for(rows)
    pieces = editor.forward.layer_gradients(rows, editor.forward.block_input(rows))
    for index, layer in enumerate((2, 3)):
        u, g = pieces[layer]
        lr = editor.net.edit_lr[index]  # 1e-3 as the float32 the net was built in
        assert torch.allclose(deltas[layer], -lr * g.T @ u, rtol=1e-10, atol=1e-14)


def test_mask_and_shift_match_the_papers_formula(tokenizer):
    """Per edit r: s_r * (-lr * (alpha_r gamma_r^T) o G_r + delta_r omega_r^T), G_r formed."""
    model = make_tiny_model(tokenizer)
    editor = editor_with_net(model)
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking net: every head nonzero
        for head in editor.net.heads:
            head.weight.normal_(0, 0.3)
            head.bias.normal_(0, 0.3)
    requests = REQUESTS[:3]
    rows = token_rows(model, [(r.rewrite_prompt, r.target_new) for r in requests])
    deltas = editor.deltas_for(rows)
    block_in = editor.forward.block_input(rows)
    net = editor.net
    expected = torch.zeros_like(deltas[3])
    for r, request in enumerate(requests):
        one = token_rows(model, [(request.rewrite_prompt, request.target_new)])
        u, g = editor.forward.layer_gradients(one, editor.forward.block_input(one))[3]
        n = int(rows.mask[r].sum())
        condition = block_in[r, :n].mean(0)
        h = torch.tanh(net.encoder(condition))
        alpha, gamma, delta, omega, eta = net.heads[1](h).split(net.sizes)
        s = 2 * torch.sigmoid(eta)
        mask = torch.outer(2 * torch.sigmoid(alpha), 2 * torch.sigmoid(gamma))
        expected += s * (-net.edit_lr[1] * mask * (g.T @ u) + torch.outer(delta, omega))
    assert torch.allclose(deltas[3], expected, rtol=1e-8, atol=1e-12)


def test_lagrange_multiplier_grows_while_the_constraint_is_violated(tokenizer):
    model = make_tiny_model(tokenizer)
    editor = editor_with_net(model, edit_lr_init=10.0)  # a big step: KL far above the margin
    train = TrainConfig()
    editor.config.kl_margin = 1e-6
    losses = editor.step_loss(REQUESTS[:2], train)
    assert losses["locality_kl"] > 1e-6
    losses["loss"].backward()
    assert editor.net.lagrange_raw.grad < 0  # descent raises lambda
    editor.net.zero_grad()
    editor.config.kl_margin = 1e6  # now satisfied: lambda should fall
    editor.step_loss(REQUESTS[:2], train)["loss"].backward()
    assert editor.net.lagrange_raw.grad > 0


def test_lagrange_multiplier_moves_at_its_own_rate(tokenizer, tmp_path):
    """Six steps with the constraint violated throughout raise lambda's raw parameter by
    ~6 x lagrange_lr (Adam's step); at the network's rate (1e-3 here) it would move 0.006.
    The edit step is large so that the KL is far above the margin: at the default step the
    float32 KL of a near-zero edit is rounding noise of either sign (CI saw lambda fall)."""
    model = make_tiny_model(tokenizer, dtype=torch.float32)
    config = KeConfig(layers=[2, 3], hidden=8, kl_margin=1e-9, lagrange_lr=0.05,
                      edit_lr_init=10.0,
                      train=dict(TRAIN, keep_best=False))
    train_ke(model, REQUESTS, [], tmp_path / "net", config, progress=False)
    from safetensors.torch import load_file

    raw = float(load_file(str(tmp_path / "net" / "hypernet.safetensors"))["lagrange_raw"])
    assert 0.2 < raw <= 0.3 + 1e-6


def test_training_resumes_exactly_and_editing_loads_the_net(tokenizer, tmp_path):
    model = make_tiny_model(tokenizer, dtype=torch.float32)
    full = train_ke(model, REQUESTS, REQUESTS[:2], tmp_path / "full", small_config(),
                    progress=False, edit_success=edit_success)
    assert "val_edit_success" in full["history"][0] and "lagrange" in full["history"][0]
    train_ke(model, REQUESTS, [], tmp_path / "split", small_config(steps=3), progress=False)
    train_ke(model, REQUESTS, [], tmp_path / "split", small_config(), progress=False)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "hypernet.safetensors"))
    b = load_file(str(tmp_path / "split" / "hypernet.safetensors"))
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    assert a["heads.0.weight"][:8].abs().sum() > 0  # alpha's head left zero

    before = model.weight(3).clone()
    handle = fe.edit(model, REQUESTS[:1], method="ke", checkpoint=str(tmp_path / "full"),
                     progress=False)
    assert not torch.equal(model.weight(3), before)
    handle.restore()
    assert torch.equal(model.weight(3), before)
    with pytest.raises(ValueError, match="'ke' hypernetwork, not 'mend'"):
        fe.edit(model, REQUESTS[:1], method="mend", checkpoint=str(tmp_path / "full"))


def test_bad_ke_configs_are_explained(tokenizer, tmp_path):
    model = make_tiny_model(tokenizer)
    with pytest.raises(ConfigError, match="KeConfig.checkpoint"):
        fe.edit(model, REQUESTS[:1], method="ke")
    with pytest.raises(FileNotFoundError, match="factedit train ke"):
        fe.edit(model, REQUESTS[:1], method="ke", checkpoint=str(tmp_path))
    with pytest.raises(ConfigError, match="kl_margin"):
        KeConfig(kl_margin=0)
    with pytest.raises(ConfigError, match="train"):
        KeConfig(train={"stepz": 3})


def test_cli_set_reaches_the_method_config():
    from factedit.cli import _method_overrides, build_parser

    args = build_parser().parse_args(["edit", "--method", "ke", "--set", "checkpoint=nets/ke",
                                      "--set", "layers=[28, 29]", "--set", "kl_margin=0.1"])
    assert _method_overrides(args) == {"checkpoint": "nets/ke", "layers": [28, 29],
                                       "kl_margin": 0.1}
    bad = build_parser().parse_args(["edit", "--set", "checkpoint"])
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        _method_overrides(bad)
