"""What the hypernetwork editors (MEND, KE) share: the forward pass of the
edited layers only, per-layer gradient pieces, and one resumable training loop.

Both edit the MLP output projections of a few top layers. Everything below the first
edited layer never changes, so its output is computed once per batch (inference mode) and
fed in with `start_at_layer`: a training step runs only the top blocks, which on the
built-in model is a tenth of a full forward.

`layer_gradients` returns, per edited layer, the two factors of the fine-tuning gradient,
dL/dW = sum_t g_t u_t^T (u_t: the layer's input at token t, g_t: dL/d output): what MEND
transforms and what KE conditions on. `EditedForward` adds a delta to a layer's output as
x @ delta^T in a forward hook, so the weights are never written and autograd reaches the
hypernetwork through the delta.

`HypernetEditor` is what both editors share around their networks: loading a trained
checkpoint, turning a batch of requests into deltas, and the edit/locality losses.
`train_editor` builds a fresh network for either and runs `train_hypernetwork`, the single
training loop (checkpoints, resume, progress bar, validation edit success) behind
`factedit train mend` and `factedit train ke`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ...models import EditableModel, Trace, frozen, start_at_layer
from ...models.scoring import TokenRows, mean_nll_per_row, token_rows
from ...requests import EditRequest
from ..base import ConfigError, Editor, EditResult, MethodConfig, Trainer
from ..config import check_layer_list, check_positive

log = logging.getLogger(__name__)


class EditedForward:
    """Forward passes of blocks `layers[0]`.. with optional deltas on their MLP outputs."""

    def __init__(self, model: EditableModel, layers: Sequence[int]) -> None:
        self.model = model
        self.layers = sorted(layers)
        for layer in self.layers:
            model.check_layer(layer, "layers")

    def block_input(self, rows: TokenRows) -> torch.Tensor:
        """What enters the first edited block (constant: nothing below it is edited)."""
        return self.block_inputs(rows)[0]

    def block_inputs(self, *row_sets: TokenRows) -> list[torch.Tensor]:
        """block_input of several row sets from one forward pass: the blocks below the edit
        are most of the model, and one padded batch keeps the two cores busier than three
        small ones. Rows are right-padded, so a row's real positions do not see the padding."""
        model = self.model
        width = max(rows.ids.shape[1] for rows in row_sets)
        pad = model.tokenizer.pad_token_id

        def widen(t: torch.Tensor, value: int) -> torch.Tensor:
            return F.pad(t, (0, width - t.shape[1]), value=value)

        ids = torch.cat([widen(rows.ids, pad) for rows in row_sets])
        mask = torch.cat([widen(rows.mask, 0) for rows in row_sets])
        with torch.inference_mode(), Trace(model.model, model.arch.layer(self.layers[0]),
                                           retain_input=True, stop=True) as block:
            model.model(input_ids=ids, attention_mask=mask, use_cache=False)
        out, start = [], 0
        for rows in row_sets:
            b, t = rows.ids.shape
            out.append(block.input[start:start + b, :t].clone())
            start += b
        return out

    @contextmanager
    def _hooks(self, deltas: dict[int, torch.Tensor] | None,
               outputs: list[torch.Tensor] | None, inputs: list[torch.Tensor] | None
               ) -> Iterator[None]:
        handles = []
        for layer in self.layers:
            delta = (deltas or {}).get(layer)

            def hook(_module, args, out, delta=delta):
                x = args[0]
                if inputs is not None:
                    inputs.append(x.detach())
                if delta is not None:  # W + delta without writing W: x @ delta^T
                    out = out + x @ delta.to(x.dtype).T
                if outputs is not None:
                    outputs.append(out)
                return out

            handles.append(self.model.mlp_out(layer).register_forward_hook(hook))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def hidden(self, rows: TokenRows, block_in: torch.Tensor,
               deltas: dict[int, torch.Tensor] | None = None,
               outputs: list[torch.Tensor] | None = None,
               inputs: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Last hidden state (B, T, d) with `deltas` (layer -> (d_out, d_in)) applied."""
        model = self.model
        with start_at_layer(model.layers, self.layers[0], block_in, model.block_returns_tuple), \
             self._hooks(deltas, outputs, inputs):
            return model.model.base_model(input_ids=rows.ids, attention_mask=rows.mask,
                                          use_cache=False).last_hidden_state

    def answer_logp(self, hidden: torch.Tensor, rows: TokenRows) -> torch.Tensor:
        """log-softmax at every answer position: (N, vocab)."""
        return torch.log_softmax(self.model.head_logits(hidden[rows.row, rows.pos]).float(), -1)

    def nll(self, hidden: torch.Tensor, rows: TokenRows) -> torch.Tensor:
        """Mean over rows of each row's mean answer-token NLL (a scalar)."""
        return mean_nll_per_row(self.model, hidden, rows.row, rows.pos, rows.tok,
                                rows.n_rows).mean()

    def layer_gradients(self, rows: TokenRows, block_in: torch.Tensor
                        ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """layer -> (u (N, d_in), g (N, d_out)) over the real tokens: dNLL/dW = g^T u."""
        outputs: list[torch.Tensor] = []
        inputs: list[torch.Tensor] = []
        with frozen(self.model.model), torch.enable_grad():
            # The block input needs a gradient only so autograd records the blocks above it;
            # no weight gradient is computed.
            start = block_in.detach().requires_grad_(True)
            hidden = self.hidden(rows, start, outputs=outputs, inputs=inputs)
            loss = self.nll(hidden, rows) * rows.n_rows  # sum over rows: one edit each
            grads = torch.autograd.grad(loss, outputs)
        real = rows.mask.bool()
        return {layer: (x[real].detach(), g[real].detach())
                for layer, x, g in zip(self.layers, inputs, grads)}


def kl_from(reference_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Mean KL(reference || current) over positions (both log-probabilities)."""
    return F.kl_div(logp, reference_logp, log_target=True, reduction="batchmean")


def edit_pairs(request: EditRequest) -> tuple[tuple[str, str], tuple[str, str],
                                              tuple[str, str] | None]:
    """(edit pair, equivalence pair, locality pair or None) of one training request."""
    edit = (request.rewrite_prompt, request.target_new)
    equivalence = (request.paraphrases[0], request.target_new) if request.paraphrases else edit
    locality = tuple(request.neighborhood[0]) if request.neighborhood else None
    return edit, equivalence, locality  # type: ignore[return-value]


# -- one training loop for both hypernetworks --------------------------------------------------

@dataclass
class TrainConfig:
    """steps, lr, batch_size (edits per step), edit_weight/locality_weight (MEND's c_edit and
    c_loc), checkpoint_every and validate_every (steps), seed.

    keep_best: the trained network is the one with the best validation edit success (a later
    step wins a tie), not the last step's: on the built-in model MEND's held-out success
    peaked at 0.94 (step 500) and fell to 0.78 by step 2000 as the locality term shrank the
    edits.

    lr_lr: Adam's learning rate for the per-layer edit step sizes (MEND's lr_lr); None: half
    their initial value. Adam moves a parameter by ~lr per step whatever its
    gradient's scale, so with the network's lr an edit step size of 1e-6 (what the built-in
    model needs: at 1e-5 a batch of 8 edits already costs KL 13 on unrelated prompts) jumps to
    1e-4 in one step and the edits wreck the model.
    """

    steps: int = 2000
    lr: float = 1e-4
    lr_lr: float | None = None
    keep_best: bool = True
    batch_size: int = 8
    edit_weight: float = 0.1
    locality_weight: float = 1.0
    checkpoint_every: int = 100
    validate_every: int = 250
    seed: int = 0


StepLoss = Callable[[Sequence[EditRequest]], dict[str, torch.Tensor]]


def _atomic_save(tensors: dict[str, torch.Tensor], manifest: dict[str, Any], folder: Path,
                 stem: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{stem}.safetensors.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, folder / f"{stem}.safetensors")
    tmp_json = folder / f".{stem}.json.tmp"
    tmp_json.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp_json, folder / f"{stem}.json")


def _optimiser_tensors(optimiser: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimiser.state_dict()
    tensors, steps = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if key == "step":
                steps[str(index)] = float(value)
            else:
                tensors[f"opt.{index}.{key}"] = value
    return tensors, {"steps": steps, "param_groups": state["param_groups"]}


def _load_optimiser(optimiser: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                    meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, step in meta["steps"].items():
        state.setdefault(int(index), {})["step"] = torch.tensor(step)
    optimiser.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def train_hypernetwork(
    net: torch.nn.Module,
    step_loss: StepLoss,
    train: Sequence[EditRequest],
    out_dir: str | Path,
    config: TrainConfig,
    manifest: dict[str, Any],
    validate: Callable[[], dict[str, float]] | None = None,
    resume: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Train `net` (its parameters) on `step_loss` over batches of `train`; resumable.

    `step_loss(batch)` returns {"loss": scalar to minimise, ...diagnostics}. A checkpoint
    (the net, Adam's state, the step) is written atomically to out_dir/checkpoint.* every
    `checkpoint_every` steps; with resume=True a run continues from it, and batches are
    drawn from a generator seeded by (seed, step), so a resumed run sees the same batches.
    The final weights go to out_dir/hypernet.safetensors with `manifest` (+ history) in
    out_dir/hypernet.json.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    named = [(name, p) for name, p in net.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    # A net may name parameters that need their own Adam rate (KE's Lagrange multiplier:
    # at the network's 1e-4 it would take 10,000 steps to move by one).
    own_rates: dict[str, float] = dict(getattr(net, "own_learning_rates", {}))
    groups = [{"params": [p for name, p in named if name != "edit_lr" and name not in own_rates]}]
    step_sizes = [p for name, p in named if name == "edit_lr"]
    if step_sizes:
        lr_lr = config.lr_lr
        if lr_lr is None:
            lr_lr = float(step_sizes[0].detach().abs().max()) / 2
        groups.append({"params": step_sizes, "lr": lr_lr})
    groups.extend({"params": [p], "lr": own_rates[name]} for name, p in named
                  if name in own_rates)
    optimiser = torch.optim.Adam(groups, lr=config.lr)
    start, history = 0, []
    ckpt = out / "checkpoint.safetensors"
    best_score, best_file = -math.inf, out / "best.json"
    if resume and best_file.is_file():
        best_score = float(json.loads(best_file.read_text())["edit_success"])
    elif not resume:  # a restart must not inherit an earlier run's best network
        for stale in ("best.json", "best.safetensors"):
            (out / stale).unlink(missing_ok=True)
    if resume and ckpt.is_file():
        tensors = load_file(str(ckpt))
        meta = json.loads((out / "checkpoint.json").read_text())
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        _load_optimiser(optimiser, tensors, meta["optimiser"])
        start, history = int(meta["step"]), meta.get("history", [])
        log.info("resuming hypernetwork training at step %d from %s", start, out)
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps,
               desc="training", unit="step", disable=not progress)
    started = time.perf_counter()
    for step in bar:
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        batch_index = torch.randperm(len(train), generator=generator)[:config.batch_size]
        losses = step_loss([train[i] for i in batch_index.tolist()])
        optimiser.zero_grad()
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 100.0)
        optimiser.step()
        values = {k: float(v.detach()) for k, v in losses.items()}
        bar.set_postfix({k: f"{v:.3f}" for k, v in values.items()})
        done = step + 1
        if validate is not None and (done % config.validate_every == 0 or done == config.steps):
            scores = validate()
            history.append({"step": done, **values, **{f"val_{k}": v for k, v in scores.items()}})
            if scores.get("edit_success", -math.inf) >= best_score:
                best_score = scores["edit_success"]
                _atomic_save(dict(net.state_dict()), {"step": done, **scores}, out, "best")
            tqdm.write(f"step {done}: " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                     history[-1].items() if k != "step"))
        if done % config.checkpoint_every == 0 or done == config.steps:
            tensors = {f"net.{k}": v for k, v in net.state_dict().items()}
            opt_tensors, opt_meta = _optimiser_tensors(optimiser)
            tensors.update(opt_tensors)
            _atomic_save(tensors, {"step": done, "optimiser": opt_meta, "history": history},
                         out, "checkpoint")
    final = dict(manifest, history=history, steps=config.steps,
                 train_seconds=time.perf_counter() - started, selected_step=config.steps)
    if config.keep_best and best_file.is_file():
        net.load_state_dict(load_file(str(out / "best.safetensors")))
        final["selected_step"] = json.loads(best_file.read_text())["step"]
    _atomic_save(dict(net.state_dict()), final, out, "hypernet")
    return final


def load_hypernet(folder: str | Path, kind: str, model_id: str | None = None
                  ) -> tuple[dict[str, torch.Tensor], dict]:
    """The trained weights and manifest in `folder`, or a clear error saying how to make them."""
    path = Path(folder) / "hypernet.safetensors"
    if not path.is_file():
        raise FileNotFoundError(
            f"no trained {kind} hypernetwork at {path}: train one with `factedit train {kind} "
            f"--model M --data counterfact-train --out {folder}`")
    manifest = json.loads((Path(folder) / "hypernet.json").read_text())
    if manifest.get("kind") != kind:
        raise ValueError(f"{path} holds a {manifest.get('kind')!r} hypernetwork, not {kind!r}")
    if model_id is not None and manifest.get("model_id") != model_id:
        raise ValueError(f"checkpoint={str(folder)!r} was trained for "
                         f"{manifest.get('model_id')}, not {model_id}")
    return load_file(str(path)), manifest


# -- the editor around a network ---------------------------------------------------------------

@dataclass
class HypernetConfig(MethodConfig):
    """What every hypernetwork editor has.

    checkpoint: folder written by `factedit train <method>` (hypernet.safetensors + .json).
    layers: edited layers (None: the top three; editing reads them from the checkpoint).
    edit_lr_init: initial per-layer edit step size (training only).
    train: the training loop's settings (TrainConfig's fields).
    """

    checkpoint: str | None = None
    layers: list[int] | None = None
    edit_lr_init: float = 1e-4
    train: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_positive(self, "edit_lr_init")
        check_layer_list(self)
        unknown = set(self.train) - set(TrainConfig.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"{type(self).__name__}.train has unknown field(s) "
                              f"{sorted(unknown)}; valid: {sorted(TrainConfig.__dataclass_fields__)}")


def edited_shape(model: EditableModel, layers: Sequence[int]) -> tuple[int, int]:
    """(d_out, d_in) shared by the edited weights: one network serves all of them."""
    shapes = {model.weight_shape(layer) for layer in layers}
    if len(shapes) != 1:
        raise ConfigError(f"layers={list(layers)}: the edited weights have different shapes "
                          f"{sorted(shapes)}; choose layers of one shape")
    return next(iter(shapes))


class HypernetEditor(Editor):
    """An editor whose deltas come from a trained network (MEND, KE).

    Subclasses set `kind`, and implement `net_settings` (what `build_net` needs, saved in the
    manifest), `build_net`, `deltas_for` and `step_loss`.
    """

    kind: ClassVar[str]
    config: HypernetConfig

    def __init__(self, model: EditableModel, config: HypernetConfig,
                 net: nn.Module | None = None) -> None:
        super().__init__(model, config)
        if net is None:
            if config.checkpoint is None:
                raise ConfigError(
                    f"{type(config).__name__}.checkpoint is not set: {self.kind} edits with a "
                    f"trained hypernetwork; train one with `factedit train {self.kind} --model M "
                    f"--data counterfact-train --out DIR` and pass checkpoint=DIR")
            tensors, manifest = load_hypernet(config.checkpoint, self.kind, model.model_id)
            self.layers = list(manifest["layers"])
            net = self.build_net(model, self.layers, manifest["net"])
            net.load_state_dict(tensors)
        else:
            self.layers = list(config.layers or default_layers(model))
        self.net = net
        self.forward = EditedForward(model, self.layers)

    @classmethod
    def net_settings(cls, config: HypernetConfig) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def build_net(cls, model: EditableModel, layers: Sequence[int], settings: dict[str, Any],
                  seed: int = 0) -> nn.Module:
        raise NotImplementedError

    def deltas_for(self, rows: TokenRows, block_in: torch.Tensor | None = None
                   ) -> dict[int, torch.Tensor]:
        """layer -> the edit (d_out, d_in) for the edit rows (graph kept to the net);
        `block_in`: the rows' block_input when the caller has it already."""
        raise NotImplementedError

    def step_loss(self, batch: Sequence[EditRequest], train: TrainConfig
                  ) -> dict[str, torch.Tensor]:
        """{"loss": ..., diagnostics} of one training batch of edits applied together."""
        raise NotImplementedError

    def compute(self, requests: Sequence[EditRequest]) -> EditResult:
        """Deltas the trained network produces for the requests' fine-tuning gradients (no grad),
        with each layer's delta norm in info."""
        result = EditResult()
        rows = token_rows(self.model, [(r.rewrite_prompt, r.target_new) for r in requests])
        with result.timed("hypernet"), torch.no_grad():
            deltas = self.deltas_for(rows)
        for layer, delta in deltas.items():
            param = self.model.mlp_out(layer).weight
            result.deltas[self.weight_param_name(layer)] = self.as_param_delta(delta, param)
        result.info["delta_norm"] = {layer: float(d.norm()) for layer, d in deltas.items()}
        return result

    def edit_and_locality(self, batch: Sequence[EditRequest]
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's edits applied together: (NLL of target_new on the equivalence prompts,
        KL(unedited || edited) on the neighbourhood prompts), both differentiable in the net."""
        pairs = [edit_pairs(r) for r in batch]
        edit_rows = token_rows(self.model, [p[0] for p in pairs])
        # The edit loss reads the edit prompt and its paraphrase: trained on paraphrases alone,
        # MEND on the built-in model generalised (0.89) better than it edited (0.77).
        equivalence = token_rows(self.model, [p[0] for p in pairs]
                                 + [p[1] for p in pairs if p[1] != p[0]])
        local_pairs = [p[2] for p in pairs if p[2] is not None]
        fwd = self.forward
        local = token_rows(self.model, local_pairs) if local_pairs else None
        row_sets = [edit_rows, equivalence] + ([local] if local is not None else [])
        edit_in, equivalence_in, *local_in = fwd.block_inputs(*row_sets)
        deltas = self.deltas_for(edit_rows, edit_in)
        edit_loss = fwd.nll(fwd.hidden(equivalence, equivalence_in, deltas), equivalence)
        locality = torch.zeros((), device=self.model.device)
        if local is not None:
            with torch.no_grad():
                reference = fwd.answer_logp(fwd.hidden(local, local_in[0]), local)
            locality = kl_from(reference, fwd.answer_logp(fwd.hidden(local, local_in[0], deltas),
                                                          local))
        return edit_loss, locality


def default_layers(model: EditableModel) -> list[int]:
    return list(range(model.num_layers - 3, model.num_layers))


# edit_success(editor, requests): the share of `requests` that one edit each by `editor`
# makes succeed; the caller supplies it (factedit.protocol.edit_success), since applying an
# edit and scoring it are the layers above the methods.
EditSuccess = Callable[[Editor, Sequence[EditRequest]], float]


def training_summary(result: dict[str, Any]) -> str:
    """One line about a finished `train_editor` run (what `factedit train` prints)."""
    last = result["history"][-1] if result["history"] else {}
    return (f"trained {result['kind']} for {result['model_id']} on {result['n_train']} edits in "
            f"{result['train_seconds']:.0f} s; last validation: {last}")


def train_editor(editor_cls: type[HypernetEditor], model: EditableModel,
                 train: Sequence[EditRequest], validation: Sequence[EditRequest],
                 out_dir: str | Path, config: HypernetConfig, resume: bool = True,
                 progress: bool = True, edit_success: EditSuccess | None = None
                 ) -> dict[str, Any]:
    """Train a fresh `editor_cls` network for `model` on `train`; writes out_dir/hypernet.*.

    Every `validate_every` steps the network is scored by `edit_success(editor, validation)`
    (needed when `validation` is not empty)."""
    if validation and edit_success is None:
        raise ValueError("train_editor: validation requests need edit_success= (e.g. "
                         "factedit.protocol.edit_success), or pass validation=[]")
    train_config = TrainConfig(**config.train)
    layers = list(config.layers or default_layers(model))
    settings = editor_cls.net_settings(config)
    net = editor_cls.build_net(model, layers, settings, seed=train_config.seed)
    editor = editor_cls(model, dataclasses.replace(config, layers=layers), net=net)
    manifest = {"kind": editor_cls.kind, "model_id": model.model_id, "layers": layers,
                "net": settings, "train": train_config.__dict__, "n_train": len(train)}

    def validate() -> dict[str, float]:
        with torch.no_grad():
            return {"edit_success": edit_success(editor, validation)}

    with frozen(model.model):  # only the hypernetwork trains
        return train_hypernetwork(net, lambda batch: editor.step_loss(batch, train_config),
                                  train, out_dir, train_config, manifest,
                                  validate if validation else None, resume, progress)


def hypernet_trainer(editor_cls: type[HypernetEditor], config_cls: type[HypernetConfig],
                     what: str) -> Trainer:
    """The registry's Trainer of a hypernetwork editor: `train_editor` with the method's
    config (its defaults where none is given), writing the `checkpoint` folder."""

    def run(model: EditableModel, train: Sequence[EditRequest],
            validation: Sequence[EditRequest], out_dir: str | Path,
            config: HypernetConfig | None = None, resume: bool = True,
            progress: bool = True, edit_success: EditSuccess | None = None) -> dict[str, Any]:
        return train_editor(editor_cls, model, train, validation, out_dir,
                            config or config_cls(), resume, progress, edit_success)

    run.__doc__ = (f"Train {editor_cls.kind.upper()} for `model` on `train`; writes "
                   f"out_dir/hypernet.* (see methods/hypernet/base.py).")
    return Trainer(run, config_cls, output_field="checkpoint", what=what,
                   summary=training_summary)
