"""MEND (Mitchell et al., ICLR 2022): a hypernetwork that turns a fine-tuning gradient into
an edit.

For an edited weight W (d_out, d_in) the fine-tuning gradient of the edit loss is a sum of
rank-one pieces, dL/dW = sum_t g_t u_t^T (factedit.methods.hypernet.layer_gradients). MEND
maps each piece through a small network and writes

    z_t  = [norm(u_t), norm(g_t)] * scale_l + shift_l        (per-layer "mode shift")
    z~_t = z_t + U_k relu(V_k z + b_k), k = 1..n_hidden       (low rank, U_k zero at init)
    [u~_t, g~_t] = z~_t
    W <- W - lr_l * sum_t g~_t u~_t^T                         (lr_l learned, per layer)

One network is shared by all edited layers (they have one shape here); norm() uses the
mean and std of u and g over the first training batch (kept as buffers). Training
(`factedit train mend`) minimises

    edit_weight * NLL(target_new | paraphrase; W~) + locality_weight * KL(p_W || p_W~) on a
    neighbourhood prompt

for `batch_size` edits applied together per step (c_edit = 0.1, c_loc = 1, as the paper);
MendConfig's default is one edit per step.

Departures from the paper and its code: only the MLP output projections of the top
`layers` are edited (the reference edits both MLP matrices of the last three blocks); the
identity-initialised MLP has rank `rank` (the reference uses 1920 on GPT-2-size models);
the edit loss reads the edit prompt and the request's first paraphrase (the paper: an
example of the equivalence neighbourhood); the trained network is the one with the best
validation edit success (TrainConfig.keep_best); the norms are fixed after the first batch
rather than running averages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...models import EditableModel
from ...requests import EditRequest
from ..base import register_method
from ..config import check_positive
from .base import (
    HypernetConfig,
    HypernetEditor,
    TokenRows,
    TrainConfig,
    edited_shape,
    hypernet_trainer,
)


@dataclass
class MendConfig(HypernetConfig):
    """MEND (checkpoint, layers, edit_lr_init, train: see HypernetConfig).

    rank, n_hidden: the editor network's shape (training only; editing reads the manifest).

    Training defaults measured on the built-in model (bench/RESULTS.md, MEND section): edit
    step size 1e-6 (1e-4 makes an untrained batch of edits cost KL 181 nats on unrelated
    prompts), one edit per training step as in single-edit use (batches of 8 sat at 0.42
    validation edit success after 250 steps; one edit per step reached 0.94 at step 500,
    five times faster per step).
    """

    edit_lr_init: float = 1e-6
    train: dict = field(default_factory=lambda: {"batch_size": 1})
    rank: int = 256
    n_hidden: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "rank", "n_hidden")


class MendNet(nn.Module):
    """The gradient transform of one weight shape, shared across `n_layers` layers."""

    def __init__(self, d_in: int, d_out: int, n_layers: int, rank: int, n_hidden: int,
                 edit_lr_init: float, seed: int = 0) -> None:
        super().__init__()
        width = d_in + d_out
        generator = torch.Generator().manual_seed(seed)  # a rerun starts from the same net
        self.d_in = d_in
        self.scale = nn.Parameter(torch.ones(n_layers, width))
        self.shift = nn.Parameter(torch.zeros(n_layers, width))
        self.down = nn.ParameterList([nn.Parameter(torch.randn(rank, width, generator=generator)
                                                 / width ** 0.5)
                                      for _ in range(n_hidden)])
        # Zero up-projections: at initialisation the network is the identity, so an untrained
        # MEND is plain fine-tuning with step edit_lr.
        self.up = nn.ParameterList([nn.Parameter(torch.zeros(width, rank))
                                    for _ in range(n_hidden)])
        self.bias = nn.ParameterList([nn.Parameter(torch.zeros(rank)) for _ in range(n_hidden)])
        self.edit_lr = nn.Parameter(torch.full((n_layers,), float(edit_lr_init)))
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))
        self.register_buffer("normalised", torch.zeros(()))

    def set_norms(self, u: torch.Tensor, g: torch.Tensor) -> None:
        z = torch.cat([u, g], dim=1).float()
        self.mean.copy_(z.mean(0))
        self.std.copy_(z.std(0).clamp_min(1e-8))
        self.normalised.fill_(1.0)

    def delta(self, index: int, u: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The edit -lr * sum_t g~_t u~_t^T of layer `index` from its pieces: (d_out, d_in)."""
        z = (torch.cat([u, g], dim=1).float() - self.mean) / self.std
        z = z * self.scale[index] + self.shift[index]
        for down, up, bias in zip(self.down, self.up, self.bias):
            z = z + torch.relu(z @ down.T + bias) @ up.T
        u_t, g_t = z[:, :self.d_in], z[:, self.d_in:]
        return -self.edit_lr[index] * (g_t.T @ u_t)


class MendEditor(HypernetEditor):
    """MEND: a low-rank network transforms the fine-tuning gradient's factors (u, g) of each
    edited layer into the delta it applies (module docstring)."""

    config_cls = MendConfig
    config: MendConfig
    kind = "mend"
    net: MendNet

    @classmethod
    def net_settings(cls, config: HypernetConfig) -> dict[str, Any]:
        assert isinstance(config, MendConfig)
        return {"rank": config.rank, "n_hidden": config.n_hidden,
                "edit_lr_init": config.edit_lr_init}

    @classmethod
    def build_net(cls, model: EditableModel, layers: Sequence[int], settings: dict[str, Any],
                  seed: int = 0) -> MendNet:
        d_out, d_in = edited_shape(model, layers)
        return MendNet(d_in, d_out, len(layers), settings["rank"], settings["n_hidden"],
                       settings["edit_lr_init"], seed).to(model.device)

    def deltas_for(self, rows: TokenRows, block_in: torch.Tensor | None = None
                   ) -> dict[int, torch.Tensor]:
        """Per edited layer, the delta the network makes of the rows' gradient pieces (their
        normalisation statistics are set from the first batch the net sees)."""
        if block_in is None:
            block_in = self.forward.block_input(rows)
        pieces = self.forward.layer_gradients(rows, block_in)
        if not bool(self.net.normalised):
            u, g = pieces[self.layers[0]]
            self.net.set_norms(u, g)
        return {layer: self.net.delta(i, *pieces[layer]) for i, layer in enumerate(self.layers)}

    def step_loss(self, batch: Sequence[EditRequest], train: TrainConfig
                  ) -> dict[str, torch.Tensor]:
        """MEND's loss: c_edit * edit NLL + c_loc * locality KL."""
        edit_loss, locality = self.edit_and_locality(batch)
        loss = train.edit_weight * edit_loss + train.locality_weight * locality
        return {"loss": loss, "edit_nll": edit_loss.detach(), "locality_kl": locality.detach()}


_trainer = hypernet_trainer(MendEditor, MendConfig, "the gradient-transform hypernetwork")
train_mend = _trainer.run

register_method("mend", MendConfig, MendEditor,
                "gradient-decomposition hypernetwork (Mitchell et al. 2022); needs "
                "`factedit train mend`",
                trainer=_trainer)
