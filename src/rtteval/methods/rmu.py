"""RMU — Representation Misdirection for Unlearning (Li et al. 2024, WMDP).

At decoder layer ℓ, push the residual-stream activations on forget prose
toward ``c·u`` (``u`` a fixed, seeded random unit vector, ``c`` the steering
coefficient) and keep the activations on retain text equal to a frozen
copy's:

    loss = MSE(h_ℓ(forget), c·u) + α·MSE(h_ℓ(retain), h_ℓ^frozen(retain))

with MSE over real (non-pad) tokens only.  Only a few parameters are
trained: by default the MLP down-projections of layers ℓ-2…ℓ, as in the WMDP
reference (layer 7 of 32, c 6.5–20, α 100–1200, lr 5e-5, AdamW).  ``modules``
names them by substring; one outside the decoder blocks (``embed_tokens``,
the tiny models' default) is trained whatever ``param_layers`` says.  The layer
scales with depth (:func:`default_layer`); ``c`` must be large against the
layer's typical activation norm, so tiny models have their own defaults.
"""

from __future__ import annotations

import torch

from rtteval.errors import ConfigError
from rtteval.methods import register
from rtteval.methods.base import (
    PAPER_ADAMW,
    PAPER_TRAIN,
    TINY_TRAIN,
    Method,
    Trainable,
    UnlearnContext,
    decoder_layers,
    layer_activations,
    layer_index,
    num,
)
from rtteval.methods.losses import rmu_forget_loss, rmu_retain_loss
from rtteval.training.batching import pad_batch
from rtteval.training.losses import LossFn


def default_layer(n_layers: int) -> int:
    """WMDP's layer 7 of 32, scaled to depth, but at least 1 so ℓ-1 exists too."""
    return min(n_layers - 1, max(1, round(7 * n_layers / 32)))


def control_vector(hidden: int, coef: float, seed: int) -> torch.Tensor:
    """``c·u`` with ``u`` uniform in [0,1)^D then normalised (as the WMDP code does), seeded."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(hidden, generator=g)
    return coef * u / u.norm()


def steering_coefficient(ctx: UnlearnContext, ref: torch.nn.Module, layer: int) -> float:
    """``steering_coef`` if set, else ``steering_rel`` × the mean activation norm at ℓ.

    The right ``c`` is relative to the layer's activation scale (WMDP's 6.5
    suits Zephyr's layer 7; a from-scratch tiny model's activations are
    orders of magnitude larger), so tiny models set it relatively: measured
    on up to 64 forget passages under the frozen model.
    """
    if ctx.hparams.get("steering_coef") is not None:
        return float(ctx.hparams["steering_coef"])
    rel = ctx.hparams.get("steering_rel")
    if rel is None:
        raise ConfigError("RMU needs steering_coef (absolute c) or steering_rel (c / mean norm)")
    device = next(ref.parameters()).device
    batch = pad_batch(ctx.forget_seqs[:64], ctx.tokenizer.pad_token_id)
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.no_grad():
        acts = layer_activations(ref, batch, layer).float()
    mask = batch["attention_mask"].bool()
    return float(rel) * float(acts.norm(dim=-1)[mask].mean())


@register("rmu")
class RMU(Method):
    corpus = "corpus"
    needs_reference = True
    hparam_names = ("layer", "param_layers", "modules", "steering_coef", "steering_rel", "alpha")
    hparam_types = {
        "layer": num(int, ge=0) | None,
        "param_layers": list[num(int, ge=0)] | None,
        "modules": str | list[str],
        "steering_coef": num(float, gt=0) | None,
        "steering_rel": num(float, gt=0) | None,
        "alpha": num(float, ge=0),
    }
    defaults = {
        "tiny": TINY_TRAIN
        | dict(
            lr=3e-3,
            layer=None,
            param_layers=None,
            # RMU picks its own parameters (``modules``), so the shared
            # train_only is lifted; tiny models steer through the token
            # embeddings like the other methods (docs/methods.md)
            train_only=[],
            modules="embed_tokens",
            steering_coef=None,
            steering_rel=8.0,
            alpha=10.0,
        ),
        "paper": PAPER_TRAIN
        | PAPER_ADAMW
        | dict(
            lr=5e-5,
            epochs=1,
            warmup_steps=0,
            layer=7,
            param_layers=None,
            modules="mlp.down_proj",
            steering_coef=6.5,
            steering_rel=None,
            alpha=1200.0,
        ),
    }
    grid = {
        "tiny": {"lr": [1e-3, 3e-3], "alpha": [10.0, 100.0], "steering_rel": [4.0, 8.0]},
        "paper": {"alpha": [100.0, 1200.0], "steering_coef": [6.5, 20.0]},
    }

    @staticmethod
    def resolve_layers(hparams: dict, n_layers: int) -> tuple[int, list[int]]:
        """The hooked layer ℓ and the layers whose parameters are trained."""
        layer = hparams.get("layer")
        layer = default_layer(n_layers) if layer is None else int(layer)
        if not 0 <= layer < n_layers:
            raise ConfigError(f"RMU layer {layer} out of range for a {n_layers}-layer model")
        pl = hparams.get("param_layers")
        pl = list(range(max(0, layer - 2), layer + 1)) if pl is None else [int(x) for x in pl]
        return layer, pl

    def build(self, ctx: UnlearnContext) -> tuple[LossFn, Trainable]:
        if ctx.reference is None:
            raise ValueError("RMU needs a frozen reference model")
        layers = decoder_layers(ctx.model)
        layer, param_layers = self.resolve_layers(ctx.hparams, len(layers))
        modules = ctx.hparams.get("modules") or "mlp.down_proj"
        modules = [modules] if isinstance(modules, str) else list(modules)
        hidden = int(ctx.model.config.hidden_size)
        alpha, ref = float(ctx.hparams["alpha"]), ctx.reference
        device = next(ctx.model.parameters()).device
        coef = steering_coefficient(ctx, ref, layer)
        cu = control_vector(hidden, coef, ctx.seed).to(device)
        chosen = set(param_layers)

        def trainable(name: str) -> bool:
            # a module outside the decoder blocks (``embed_tokens``) has no layer index
            idx = layer_index(name)
            return (idx is None or idx in chosen) and any(m in name for m in modules)

        def loss_fn(model, batch):
            f, r = batch["forget"], batch["retain"]
            forget = rmu_forget_loss(layer_activations(model, f, layer), cu, f["attention_mask"])
            with torch.no_grad():
                frozen = layer_activations(ref, r, layer)
            retain = rmu_retain_loss(
                layer_activations(model, r, layer), frozen, r["attention_mask"]
            )
            logs = {"forget_mse": float(forget.detach()), "retain_mse": float(retain.detach())}
            return forget + alpha * retain, logs

        return loss_fn, trainable
