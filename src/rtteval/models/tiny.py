"""Tiny Llama-architecture presets for the embedded default.

They are real ``LlamaForCausalLM`` models (RoPE, RMSNorm, SwiGLU), just
small, so everything that works on them is the code path an 8B model uses.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

#: Plain data, nanoGPT-style.  ``tiny-1m`` memorises a few hundred facts on
#: 2 CPU cores in minutes; ``micro`` trains in seconds for tests.
TINY_PRESETS: dict[str, dict[str, Any]] = {
    "tiny-1m": dict(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512
    ),
    "tiny-3m": dict(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024
    ),
    "micro": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256
    ),
}


def build_tiny_model(
    preset: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seed: int = 0,
    max_position_embeddings: int = 256,
) -> LlamaForCausalLM:
    """A freshly initialised tiny Llama whose vocabulary matches ``tokenizer``."""
    if preset not in TINY_PRESETS:
        from rtteval.errors import ConfigError

        raise ConfigError(f"unknown tiny model preset {preset!r}; known: {sorted(TINY_PRESETS)}")
    spec = dict(TINY_PRESETS[preset])
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        num_key_value_heads=spec["num_attention_heads"],
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        rms_norm_eps=1e-5,
        **spec,
    )
    cfg._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
