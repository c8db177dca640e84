"""Load and save Hugging Face causal LMs.

One function for every model rtteval touches: a hub id (``meta-llama/Meta-Llama-3-8B``),
a local directory written by :func:`save_model`, or a tiny model trained here.
Weights are always safetensors; ``trust_remote_code`` stays off unless the
user asks, since a hub repo's Python would otherwise run on their machine.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rtteval.data.hub import hub_host, hub_reachable
from rtteval.errors import UserError

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def check_device(device: str, *, available: bool = True) -> None:
    """Refuse a device name torch does not know, or (``available``) one this machine lacks.

    Called when a config is validated and before a command loads anything,
    so ``device: cuda`` on a CPU-only machine fails at once rather than in
    every job.
    """
    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(
            f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps", field="device"
        ) from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"device {device!r}: rtteval runs on cpu, cuda or mps", field="device")
    if not available:
        return
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            build = "" if torch.version.cuda else ", a CPU-only torch build"
            raise UserError(
                f"device {device!r}: no CUDA GPU is available here (torch {torch.__version__}"
                f"{build}); use auto or cpu",
                field="device",
            )
        if dev.index is not None and dev.index >= n:
            raise UserError(f"device {device!r}: this machine has {n} CUDA GPU(s)", field="device")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {device!r}: MPS is not available here", field="device")


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device)
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto`` means bf16 on GPU (as the paper ran Llama-3-8B) and fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _source(name_or_path: str | Path) -> tuple[str, bool]:
    """``(ref, offline)``: check a reference that is not a local directory before any download.

    A reference that does not exist locally is a hub id; if it cannot be one
    (say ``runs/x/model``, a mistyped path) or the hub is unreachable and it
    is not in the local cache, say so in one line now rather than after the
    hub client's retries.
    """
    ref = str(name_or_path)
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise UserError("not a model directory (no config.json)", file=ref)
        if not any((path / f).is_file() for f in _TOKENIZER_FILES):
            raise UserError(
                f"model directory has no tokenizer ({' or '.join(_TOKENIZER_FILES[:2])}); save "
                "the tokenizer beside the weights (tokenizer.save_pretrained(dir))",
                file=ref,
            )
        return ref, False
    if ref.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(ref):
        raise UserError("no such local model directory (and not a Hugging Face hub id)", file=ref)
    return ref, not hub_reachable()


def check_model_source(name_or_path: str | Path) -> None:
    """Raise the one-line error :func:`load_model` would raise for a bad reference, loading nothing.

    A local directory must look like a model and its weights files must be
    whole; a hub id must be well-formed, and cached when the hub is
    unreachable.  Commands check every model this way before they create an
    output directory.
    """
    ref, offline = _source(name_or_path)
    if Path(ref).expanduser().exists():
        check_model_files(ref)
    elif offline:
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(ref, "config.json"), str):
            raise _offline_error(ref)


def _offline_error(ref: str) -> UserError:
    host, _port = hub_host()
    return UserError(
        f"no such local model directory, and as a hub id it is not in the local cache while "
        f"the Hugging Face Hub ({host}) is unreachable (a mistyped local path?)",
        file=ref,
    )


def load_tokenizer(
    name_or_path: str | Path, *, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it can pad.

    Llama-3 ships no pad token; we reuse EOS for padding, which is safe
    because every forward pass in rtteval passes an attention mask and
    position ids derived from it, and padded label positions are -100.
    """
    ref, offline = _source(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(
            ref, trust_remote_code=trust_remote_code, local_files_only=offline
        )
    except (OSError, ValueError) as e:
        if offline:
            raise _offline_error(ref) from None
        raise UserError(f"could not load tokenizer from {name_or_path!s}: {e}") from e
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise UserError(f"tokenizer of {name_or_path!s} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    name_or_path: str | Path,
    *,
    dtype: str | torch.dtype = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    device_map: str | dict | None = None,
    gradient_checkpointing: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer by hub id or local path.

    ``device_map`` (e.g. ``"auto"``) spreads a large model over several GPUs
    with accelerate; otherwise the model goes to ``device``.
    ``gradient_checkpointing`` recomputes activations during backward (in
    training mode only): it trades about a third more compute for the
    activations' memory (docs/performance.md).
    """
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    ref, offline = _source(name_or_path)
    tok = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    kwargs: dict = dict(
        dtype=torch_dtype,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
        local_files_only=offline,
    )
    if device_map is not None:
        kwargs["device_map"] = device_map
    check_model_files(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(ref, **kwargs)
    except (OSError, ValueError, SafetensorError) as e:
        if offline:
            raise _offline_error(ref) from None
        raise UserError(f"could not load model from {name_or_path!s}: {e}") from e
    if device_map is None:
        model.to(dev)
    if gradient_checkpointing:
        set_checkpointing(model, True)
    model.eval()
    record_context(model, tok)
    return model, tok


def record_context(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Cap ``tokenizer.model_max_length`` at the model's ``max_position_embeddings``.

    Scoring and training check lengths against the tokenizer
    (:func:`rtteval.scoring.check_context`), and a hub tokenizer often says
    "no limit"; the model's positions are the real one.
    """
    n = getattr(model.config, "max_position_embeddings", None)
    if isinstance(n, int) and n > 0:
        cur = getattr(tokenizer, "model_max_length", None)
        if not isinstance(cur, int) or cur > n:
            tokenizer.model_max_length = n


def write_model_files(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: str | Path
) -> None:
    """Write model (safetensors) and tokenizer into an existing staging directory."""
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))


def set_checkpointing(model: torch.nn.Module, on: bool) -> None:
    """Turn Hugging Face activation (gradient) checkpointing on or off.

    Non-reentrant checkpointing: correct when no input requires grad and
    with frozen layers (RMU).  ``activation_checkpointing_*`` in transformers
    5, ``gradient_checkpointing_*`` before.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(
            f"gradient_checkpointing: {type(model).__name__} does not support it "
            "(a Hugging Face model does)"
        )
    new = hasattr(model, "activation_checkpointing_enable")
    if on:
        kwargs = {"use_reentrant": False}
        if new:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # pragma: no cover - transformers 4
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif new:
        model.activation_checkpointing_disable()
    else:  # pragma: no cover - transformers 4
        model.gradient_checkpointing_disable()


def is_checkpointing(model: torch.nn.Module) -> bool:
    """Whether activation checkpointing is on (any layer)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def save_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
) -> Path:
    """Save model and tokenizer atomically: a crash never leaves half a model.

    ``out_dir`` follows :mod:`rtteval.outputs`: a non-empty directory needs
    ``overwrite``, and even then only rtteval's own files are replaced.
    """
    from rtteval.outputs import staged_output

    with staged_output(out_dir, overwrite=overwrite, kind="model") as stage:
        write_model_files(model, tokenizer, stage)
    return Path(out_dir)


def check_model_files(path: str | Path) -> None:
    """Raise a one-line :class:`UserError` naming a corrupt, truncated or empty weights file.

    Opening a safetensors file reads and checks only its header against the
    file's size, so this is cheap enough to run on every model before any
    work starts (``attack`` checks all three models before writing anything).
    """
    from safetensors import safe_open

    p = Path(str(path))
    if not p.is_dir():
        return
    for f in sorted(p.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as h:
                h.keys()
        except (SafetensorError, OSError, ValueError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"corrupt or truncated weights file ({msg})", file=f) from None


def snapshot_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the weights, to restore a model without reloading from disk."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def restore_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(state[k])
