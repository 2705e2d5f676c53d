"""Architecture facts as data: where each family keeps its blocks, MLPs, norms and head.

One table keyed by `config.model_type` (PEFT's `constants.py` habit). Methods ask for
"the MLP output projection of layer 12" and never test model names. GPT-2 stores its
projections as `Conv1D` (weight is d_in x d_out); that is a flag here, never guessed from shape.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any


class UnknownArchitectureError(KeyError):
    """The model family is not in the table; pass `arch=ArchSpec(...)` (or a dict) to override."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable
        return str(self.args[0])


@dataclass(frozen=True)
class ArchSpec:
    """Module paths of one family. Per-layer paths are relative to `layers[i]`.

    Fields:
        layers: the ModuleList of transformer blocks.
        mlp: the MLP of a block.
        mlp_in: the MLP's input projection (d_model -> d_ff); KN reads its neurons after it.
        mlp_gate: a gated MLP's second input projection (d_model -> d_ff, its activation
            multiplies mlp_in's output), None where the MLP has one input projection (or
            fuses both, as Phi-3's gate_up_proj).
        mlp_out: the MLP's output projection (d_ff -> d_model): the matrix ROME/MEMIT edit.
        attn_out: the attention output projection (PMET's attention target lives here).
        embed: token embedding.
        final_norm: norm before the head.
        lm_head: the output head.
        conv1d: projections are `Conv1D` (weight stored transposed, d_in x d_out).
        post_mlp_norm: the RMSNorm (name inside the block) that the MLP output passes
            through before the residual add: "post_feedforward_layernorm" on Gemma 2/3 and
            OLMo 2, None where the MLP output is added as it is. ROME's rank-one algebra holds
            on the projection either way; the memit family's residual spread writes each
            layer's share through this norm's first-order inverse (linalg.residual_to_mlp_output).
    """

    layers: str
    mlp: str
    mlp_in: str
    mlp_out: str
    attn_out: str
    embed: str
    final_norm: str
    lm_head: str
    conv1d: bool = False
    post_mlp_norm: str | None = None
    mlp_gate: str | None = None

    def layer(self, i: int) -> str:
        return f"{self.layers}.{i}"

    def mlp_out_at(self, i: int) -> str:
        return f"{self.layers}.{i}.{self.mlp_out}"

    def mlp_in_at(self, i: int) -> list[str]:
        """The MLP's input projections of block `i`: mlp_in, and mlp_gate where there is one."""
        names = [f"{self.layers}.{i}.{self.mlp_in}"]
        if self.mlp_gate:
            names.append(f"{self.layers}.{i}.{self.mlp_gate}")
        return names

    def mlp_at(self, i: int) -> str:
        return f"{self.layers}.{i}.{self.mlp}"

    def attn_out_at(self, i: int) -> str:
        return f"{self.layers}.{i}.{self.attn_out}"


_LLAMA_LIKE = ArchSpec(
    layers="model.layers",
    mlp="mlp",
    mlp_in="mlp.up_proj",
    mlp_out="mlp.down_proj",
    attn_out="self_attn.o_proj",
    embed="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
    mlp_gate="mlp.gate_proj",
)

_GPT2 = ArchSpec(
    layers="transformer.h",
    mlp="mlp",
    mlp_in="mlp.c_fc",
    mlp_out="mlp.c_proj",
    attn_out="attn.c_proj",
    embed="transformer.wte",
    final_norm="transformer.ln_f",
    lm_head="lm_head",
    conv1d=True,
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma3_text": replace(_LLAMA_LIKE, post_mlp_norm="post_feedforward_layernorm"),
    "gemma2": replace(_LLAMA_LIKE, post_mlp_norm="post_feedforward_layernorm"),
    "gpt2": _GPT2,
    "gptj": ArchSpec(
        layers="transformer.h",
        mlp="mlp",
        mlp_in="mlp.fc_in",
        mlp_out="mlp.fc_out",
        attn_out="attn.out_proj",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
    ),
    "gpt_neox": ArchSpec(
        layers="gpt_neox.layers",
        mlp="mlp",
        mlp_in="mlp.dense_h_to_4h",
        mlp_out="mlp.dense_4h_to_h",
        attn_out="attention.dense",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        # transformers 5 names the head lm_head (4.x: embed_out); EditableModel falls back
        # to the model's output embedding when the named head is absent.
        lm_head="lm_head",
    ),
    # Phi-3: gate and up projections fused in one matrix (d_model -> 2 d_ff).
    "phi3": replace(_LLAMA_LIKE, mlp_in="mlp.gate_up_proj", mlp_gate=None),
    # OLMo-2 normalises the MLP output before the residual add (no pre-MLP norm).
    "olmo2": replace(_LLAMA_LIKE, post_mlp_norm="post_feedforward_layernorm"),
    # Phi-1/1.5/2: attention and MLP in parallel on one LayerNorm, both added to the residual.
    "phi": ArchSpec(
        layers="model.layers",
        mlp="mlp",
        mlp_in="mlp.fc1",
        mlp_out="mlp.fc2",
        attn_out="self_attn.dense",
        embed="model.embed_tokens",
        final_norm="model.final_layernorm",
        lm_head="lm_head",
    ),
}
# Gemma-3 checkpoints may report the multimodal type; its text tower has the same layout
# one level down, which `resolve_arch` handles by looking at the loaded causal LM class.
ARCHITECTURES["gemma3"] = replace(ARCHITECTURES["gemma3_text"])


def resolve_arch(config: Any, override: ArchSpec | dict | None = None) -> ArchSpec:
    """Return the ArchSpec for a HF config; `override` (spec or partial dict) wins."""
    if isinstance(override, ArchSpec):
        return override
    model_type = getattr(config, "model_type", None)
    base = ARCHITECTURES.get(model_type)
    if override:
        unknown = set(override) - {f.name for f in fields(ArchSpec)}
        if unknown:
            raise ValueError(
                f"arch override has unknown fields {sorted(unknown)}; "
                f"valid fields: {[f.name for f in fields(ArchSpec)]}"
            )
        if base is None:
            return ArchSpec(**override)
        return replace(base, **override)
    if base is None:
        raise UnknownArchitectureError(
            f"factedit has no module table for model_type={model_type!r}. Known: "
            f"{sorted(ARCHITECTURES)}. Pass arch={{'layers': ..., 'mlp': ..., 'mlp_in': ..., "
            f"'mlp_out': ..., 'attn_out': ..., 'embed': ..., 'final_norm': ..., 'lm_head': ...}} "
            f"to load_model to describe it."
        )
    return base
