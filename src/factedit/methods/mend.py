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

for a batch of edits applied together, as the paper does (c_edit = 0.1, c_loc = 1).

Departures from the paper and its code: only the MLP output projections of the top
`layers` are edited (the reference edits both MLP matrices of the last three blocks); the
identity-initialised MLP has rank `rank` (the reference uses 1920 on GPT-2-size models);
the equivalence example is the request's first paraphrase (the edit prompt itself when it
has none); the norms are fixed after the first batch rather than running averages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models import EditableModel, frozen
from ..requests import EditRequest
from .base import ConfigError, Editor, EditResult, MethodConfig, register_method
from .hypernet import (
    EditedForward,
    TokenRows,
    TrainConfig,
    edit_pairs,
    kl_from,
    load_hypernet,
    token_rows,
    train_hypernetwork,
)
from .locate import check_layer_list, check_positive


@dataclass
class MendConfig(MethodConfig):
    """MEND.

    checkpoint: folder written by `factedit train mend` (hypernet.safetensors + .json).
    layers: edited layers (None: the top three; must match the trained network).
    rank, n_hidden: the editor network's shape (training only; editing reads the manifest).
    edit_lr_init: initial per-layer edit step size.
    train: the training loop's settings.
    """

    checkpoint: str | None = None
    layers: list[int] | None = None
    rank: int = 256
    n_hidden: int = 1
    edit_lr_init: float = 1e-4
    train: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_positive(self, "rank", "n_hidden", "edit_lr_init")
        check_layer_list(self)
        unknown = set(self.train) - set(TrainConfig.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"MendConfig.train has unknown field(s) {sorted(unknown)}; "
                              f"valid: {sorted(TrainConfig.__dataclass_fields__)}")


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


def _default_layers(model: EditableModel) -> list[int]:
    return list(range(model.num_layers - 3, model.num_layers))


def build_net(model: EditableModel, layers: Sequence[int], rank: int, n_hidden: int,
              edit_lr_init: float, seed: int = 0) -> MendNet:
    shapes = {tuple(model.weight(layer).shape) for layer in layers}
    if len(shapes) != 1:
        raise ConfigError(f"MendConfig.layers={list(layers)}: the edited weights have different "
                          f"shapes {sorted(shapes)}; choose layers of one shape")
    ((d_out, d_in),) = shapes
    return MendNet(d_in, d_out, len(layers), rank, n_hidden, edit_lr_init, seed).to(
        model.device)


class MendEditor(Editor):
    config_cls = MendConfig
    config: MendConfig

    def __init__(self, model: EditableModel, config: MendConfig,
                 net: MendNet | None = None) -> None:
        super().__init__(model, config)
        if net is None:
            if config.checkpoint is None:
                raise ConfigError("MendConfig.checkpoint is not set: MEND edits with a trained "
                                  "hypernetwork; train one with `factedit train mend --model M "
                                  "--data counterfact-train --out DIR` and pass checkpoint=DIR")
            tensors, manifest = load_hypernet(config.checkpoint, "mend")
            if manifest["model_id"] != model.model_id:
                raise ValueError(f"MendConfig.checkpoint={config.checkpoint!r} was trained for "
                                 f"{manifest['model_id']}, not {model.model_id}")
            self.layers = list(manifest["layers"])
            net = build_net(model, self.layers, manifest["rank"], manifest["n_hidden"],
                            config.edit_lr_init)
            net.load_state_dict(tensors)
        else:
            self.layers = list(config.layers or _default_layers(model))
        self.net = net
        self.forward = EditedForward(model, self.layers)

    def deltas_for(self, rows: TokenRows) -> dict[int, torch.Tensor]:
        """layer -> MEND's edit (d_out, d_in) for the edit rows (graph kept to the net)."""
        block_in = self.forward.block_input(rows)
        pieces = self.forward.layer_gradients(rows, block_in)
        if not bool(self.net.normalised):
            u, g = pieces[self.layers[0]]
            self.net.set_norms(u, g)
        return {layer: self.net.delta(i, *pieces[layer]) for i, layer in enumerate(self.layers)}

    def compute(self, requests: Sequence[EditRequest]) -> EditResult:
        result = EditResult()
        rows = token_rows(self.model, [(r.rewrite_prompt, r.target_new) for r in requests])
        with result.timed("hypernet"), torch.no_grad():
            deltas = self.deltas_for(rows)
        for layer, delta in deltas.items():
            param = self.model.mlp_out(layer).weight
            result.deltas[self.weight_param_name(layer)] = self.as_param_delta(delta, param)
        result.info["delta_norm"] = {layer: float(d.norm()) for layer, d in deltas.items()}
        return result

    # -- training ---------------------------------------------------------------------------
    def step_loss(self, batch: Sequence[EditRequest], train: TrainConfig
                  ) -> dict[str, torch.Tensor]:
        """MEND's loss for one batch of edits applied together."""
        pairs = [edit_pairs(r) for r in batch]
        edit_rows = token_rows(self.model, [p[0] for p in pairs])
        equivalence = token_rows(self.model, [p[1] for p in pairs])
        local_pairs = [p[2] for p in pairs if p[2] is not None]
        deltas = self.deltas_for(edit_rows)
        fwd = self.forward
        edit_loss = fwd.nll(fwd.hidden(equivalence, fwd.block_input(equivalence), deltas),
                            equivalence)
        locality = torch.zeros((), device=self.model.device)
        if local_pairs:
            local = token_rows(self.model, local_pairs)
            local_in = fwd.block_input(local)
            with torch.no_grad():
                reference = fwd.answer_logp(fwd.hidden(local, local_in), local)
            locality = kl_from(reference, fwd.answer_logp(fwd.hidden(local, local_in, deltas),
                                                          local))
        loss = train.edit_weight * edit_loss + train.locality_weight * locality
        return {"loss": loss, "edit_nll": edit_loss.detach(), "locality_kl": locality.detach()}


def edit_success(editor: Editor, requests: Sequence[EditRequest]) -> float:
    """Share of requests whose single edit makes P(target_new) > P(target_true) (efficacy)."""
    from ..metrics import evaluate
    from ..protocol import EditHandle

    scores = []
    for request in requests:
        handle = EditHandle(editor.model, editor)
        handle.step([request])
        try:
            scores.append(evaluate(editor.model, [request])["efficacy"])
        finally:
            handle.restore()
    kept = [s for s in scores if s is not None]
    return sum(kept) / len(kept) if kept else float("nan")


def train_mend(model: EditableModel, train: Sequence[EditRequest],
               validation: Sequence[EditRequest], out_dir: str | Path,
               config: MendConfig | None = None, resume: bool = True,
               progress: bool = True) -> dict[str, Any]:
    """Train MEND for `model` on `train`; writes out_dir/hypernet.* (see hypernet.py)."""
    config = config or MendConfig()
    train_config = TrainConfig(**config.train)
    layers = list(config.layers or _default_layers(model))
    net = build_net(model, layers, config.rank, config.n_hidden, config.edit_lr_init,
                    train_config.seed)
    editor = MendEditor(model, MendConfig(layers=layers, rank=config.rank,
                                          n_hidden=config.n_hidden,
                                          edit_lr_init=config.edit_lr_init), net=net)
    manifest = {"kind": "mend", "model_id": model.model_id, "layers": layers,
                "rank": config.rank, "n_hidden": config.n_hidden,
                "train": train_config.__dict__, "n_train": len(train)}

    def validate() -> dict[str, float]:
        with torch.no_grad():
            return {"edit_success": edit_success(editor, validation)}

    with frozen(model.model):  # only the hypernetwork trains
        return train_hypernetwork(net, lambda batch: editor.step_loss(batch, train_config),
                                  train, out_dir, train_config, manifest,
                                  validate if validation else None, resume, progress)


register_method("mend", MendConfig, MendEditor,
                "gradient-decomposition hypernetwork (Mitchell et al. 2022); needs "
                "`factedit train mend`")
