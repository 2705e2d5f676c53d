"""Tiny configurations of every model family factedit knows, for tests that build random models.

`tiny_config(model_type, vocab, ...)` returns the family's own `transformers` config class
filled with a few layers and a narrow width, so a test builds the real modelling code of that
family (attention variant, norms, residual layout, tied or untied head) at toy size.
Shared requests and small functions live in tests/common.py.
"""

from __future__ import annotations

from typing import Any

# Families whose config class transformers provides, in the order tests report them.
TINY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gpt2", "gptj",
                 "gpt_neox", "phi3", "olmo2", "phi")


def tiny_config(model_type: str, vocab: int, layers: int = 4, hidden: int = 64,
                pad_token_id: int | None = None, eos_token_id: int | None = None) -> Any:
    """A `transformers` config of `model_type` with `layers` blocks of width `hidden`.

    Four attention heads (two key/value heads where the family groups them), an MLP twice
    as wide as the residual, 256 positions. Special token ids are set from the caller's
    tokenizer: some families default to ids beyond a small vocabulary (Phi-3's pad 32000).
    """
    import transformers as tf

    heads, kv_heads, ffn = 4, 2, 2 * hidden
    special = dict(pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                   bos_token_id=eos_token_id)
    llama_like = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, max_position_embeddings=256, **special)
    if model_type == "llama":
        return tf.LlamaConfig(tie_word_embeddings=True, **llama_like)
    if model_type == "mistral":
        return tf.MistralConfig(sliding_window=None, **llama_like)
    if model_type == "qwen2":
        return tf.Qwen2Config(tie_word_embeddings=True, **llama_like)
    if model_type == "qwen3":
        return tf.Qwen3Config(head_dim=hidden // heads, tie_word_embeddings=True, **llama_like)
    if model_type == "gemma3":
        # A 4-token sliding window: shorter than the test prompts, so the local layers'
        # masks differ from the global ones.
        return tf.Gemma3TextConfig(head_dim=hidden // heads, sliding_window=4, **llama_like)
    if model_type == "gemma2":
        # Gemma-2 runs eager attention (its logit soft cap): a right-padded row whose padding
        # is longer than the window has fully masked rows, NaN, and 0 * NaN spreads it to the
        # row's real tokens. Real checkpoints have a 4,096-token window; so does this one.
        return tf.Gemma2Config(head_dim=hidden // heads, sliding_window=4096, **llama_like)
    if model_type == "phi3":
        return tf.Phi3Config(**llama_like)
    if model_type == "olmo2":
        return tf.Olmo2Config(**llama_like)
    if model_type == "phi":
        return tf.PhiConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                            num_hidden_layers=layers, num_attention_heads=heads,
                            partial_rotary_factor=0.5, max_position_embeddings=256, **special)
    if model_type == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads,
                             n_positions=256, **special)
    if model_type == "gptj":
        return tf.GPTJConfig(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads,
                             rotary_dim=hidden // heads // 2, n_positions=256, **special)
    if model_type == "gpt_neox":
        return tf.GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                                num_hidden_layers=layers, num_attention_heads=heads,
                                rotary_pct=0.5, max_position_embeddings=256, **special)
    raise ValueError(f"model_type={model_type!r}: tiny configs exist for {TINY_FAMILIES}")


def make_family_model(tokenizer: Any, model_type: str, layers: int = 2, hidden: int = 32,
                      seed: int = 0, init_std: float = 0.2, dtype: Any = None) -> Any:
    """A random EditableModel of `model_type` (any of TINY_FAMILIES) over `tokenizer`.

    `init_std` is the config's initializer_range. At the families' usual 0.02 a random
    model's logits are nearly uniform whatever its hidden state, so no edit can move a
    target's probability far; at 0.2 an edit that lands moves it by nats. The model id
    includes every argument, so caches (covariance) are shared only by equal models.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from factedit.models import EditableModel, resolve_arch

    torch.manual_seed(seed)
    config = tiny_config(model_type, len(tokenizer), layers, hidden,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    config.initializer_range = init_std
    model = AutoModelForCausalLM.from_config(config).to(dtype or torch.float64)
    return EditableModel(model, tokenizer, resolve_arch(model.config),
                         f"tiny-{model_type}-{layers}x{hidden}-std{init_std}-s{seed}")
