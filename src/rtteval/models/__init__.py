"""Models: HF loading/saving, tiny Llama presets and a locally trained tokenizer."""

from rtteval.models.loading import (
    load_model,
    load_tokenizer,
    resolve_device,
    restore_state,
    save_model,
    snapshot_state,
)
from rtteval.models.tiny import TINY_PRESETS, build_tiny_model, n_params
from rtteval.models.tokenizer import train_word_tokenizer

__all__ = [
    "TINY_PRESETS",
    "build_tiny_model",
    "load_model",
    "load_tokenizer",
    "n_params",
    "resolve_device",
    "restore_state",
    "save_model",
    "snapshot_state",
    "train_word_tokenizer",
]
