"""EditableModel: a Hugging Face causal LM plus what editing needs to know about it.

It forwards unknown attributes to the wrapped model (as PeftModel does), so
`model.config`, `model.parameters()` and `model(**batch)` work as usual, while
`model.generate("text")` takes and returns plain strings for quick looks.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .arch import ArchSpec
from .atomic import atomic_folder
from .hooks import get_module
from .params import module_device, read_param

log = logging.getLogger(__name__)


class LayerIndexError(IndexError):
    """A layer number the model does not have."""


def _present_head(model: nn.Module, arch: ArchSpec) -> ArchSpec:
    """`arch` with its lm_head path as this model names it: a family's head attribute can
    change between transformers versions (GPT-NeoX: embed_out in 4.x, lm_head in 5.x), so
    a path that is absent falls back to the module `get_output_embeddings()` returns."""
    try:
        get_module(model, arch.lm_head)
        return arch
    except LookupError:
        head = model.get_output_embeddings()
        name = next((n for n, m in model.named_modules() if m is head and n), None)
        if name is None:
            raise
        return replace(arch, lm_head=name)


class EditableModel:
    """A causal LM, its tokenizer and its architecture table entry.

    Attributes:
        model: the `transformers` PreTrainedModel (edited in place by weight methods).
        tokenizer: its tokenizer (pad token set; right padding for scoring).
        arch: module paths for this family.
        model_id: a stable identifier of the *unedited* weights, used in cache keys.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, arch: ArchSpec, model_id: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.arch = _present_head(model, arch)
        self.model_id = model_id
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        self.model.eval()
        self.layers: nn.ModuleList = get_module(model, arch.layers)
        self.block_returns_tuple = self._probe_block_output()

    # -- facts about the network -------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the embedding's device (its execution device when offloaded)."""
        return module_device(get_module(self.model, self.arch.embed))

    @property
    def dtype(self) -> torch.dtype:
        return get_module(self.model, self.arch.embed).weight.dtype

    @property
    def cache_field(self) -> str:
        """The base model's KV-cache argument and output field: "cache" from transformers
        5.x on (where "past_key_values" is deprecated), "past_key_values" before."""
        parameters = inspect.signature(self.model.base_model.forward).parameters
        return "cache" if "cache" in parameters else "past_key_values"

    def check_layer(self, layer: int, field_name: str = "layer") -> int:
        if not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise LayerIndexError(
                f"{field_name}={layer!r}: this model has layers 0..{self.num_layers - 1}"
            )
        return layer

    def module(self, name: str) -> nn.Module:
        return get_module(self.model, name)

    def mlp_out(self, layer: int) -> nn.Module:
        return self.module(self.arch.mlp_out_at(self.check_layer(layer)))

    def post_mlp_norm(self, layer: int) -> nn.Module | None:
        """The norm between `layer`'s MLP output and the residual (Gemma 2/3, OLMo 2), or None."""
        name = self.arch.post_mlp_norm
        if name is None:
            return None
        return self.module(f"{self.arch.layer(self.check_layer(layer))}.{name}")

    def weight_name(self, layer: int) -> str:
        """The parameter name of `layer`'s MLP output projection weight."""
        return self.arch.mlp_out_at(self.check_layer(layer)) + ".weight"

    def weight(self, layer: int) -> torch.Tensor:
        """The MLP output projection of `layer` as a (d_out, d_in) view (Conv1D transposed).

        Its current value wherever it lives (offloaded to CPU/disk included, see
        `models.params`); it may share memory with the parameter, so clone before changing.
        """
        w = read_param(self.model, self.weight_name(layer))
        return w.T if self.arch.conv1d else w

    def weight_shape(self, layer: int) -> tuple[int, int]:
        """(d_out, d_in) of `layer`'s edited matrix, without reading an offloaded value."""
        shape = tuple(self.mlp_out(layer).weight.shape)
        return (shape[1], shape[0]) if self.arch.conv1d else (shape[0], shape[1])

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on final hidden states, with the soft cap Gemma applies to its logits,
        so scores and target values see what generation sees."""
        logits = self.module(self.arch.lm_head)(hidden)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _probe_block_output(self) -> bool:
        """Does a block return a tuple (older transformers) or a bare tensor?"""
        seen: list[bool] = []
        handle = self.layers[0].register_forward_hook(
            lambda _m, _i, out: seen.append(isinstance(out, tuple))
        )
        try:
            with torch.inference_mode():
                ids = torch.tensor([[self.tokenizer.eos_token_id or 0]], device=self.device)
                self.model(input_ids=ids)
        finally:
            handle.remove()
        return bool(seen and seen[0])

    # -- convenience ----------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str], **kwargs: Any) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(list(texts), return_tensors="pt", padding=True, **kwargs)
        return {k: v.to(self.device) for k, v in batch.items()}

    def generate(self, prompt: str | Sequence[str] | None = None, max_new_tokens: int = 12,
                 **kwargs: Any) -> Any:
        """Greedy continuation(s) of text prompt(s), returned as text (the prompt left out).

        Called with tensors instead (input_ids=...), it is the wrapped model's `generate`.
        """
        if prompt is None or isinstance(prompt, torch.Tensor):
            if prompt is not None:
                kwargs["input_ids"] = prompt
            return self.model.generate(max_new_tokens=max_new_tokens, **kwargs)
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        self.tokenizer.padding_side = "left"
        try:
            batch = self.tokenize(prompts)
        finally:
            self.tokenizer.padding_side = "right"
        kwargs.setdefault("do_sample", False)
        kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        with torch.inference_mode():
            out = self.model.generate(**batch, max_new_tokens=max_new_tokens, **kwargs)
        texts = self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:],
                                            skip_special_tokens=True)
        return texts[0] if single else texts

    def save_pretrained(self, path: str | Path, *, overwrite: bool = False) -> None:
        """Write the (edited) model and tokenizer as a HF folder of safetensors.

        The folder appears whole or not at all (written beside it, then renamed): a full
        disk or a kill leaves no half folder. An existing non-empty folder is refused unless
        `overwrite`, which replaces it once the new one is complete."""
        with atomic_folder(path, force=overwrite, what="save_pretrained path") as tmp:
            self.model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
        log.info("saved model to %s", path)

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: forward to the wrapped HF model.
        if name in {"model", "tokenizer", "arch", "model_id", "layers"}:
            raise AttributeError(name)
        return getattr(self.model, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __repr__(self) -> str:
        return (f"EditableModel({self.model_id!r}, {type(self.model).__name__}, "
                f"{self.num_layers} layers, {self.dtype}, {self.device})")
