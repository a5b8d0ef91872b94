"""The training step: the b1.58 learning-rate and weight-decay schedules, AdamW with gradient
clipping, the loss (cross-entropy with an optional z-loss and optional logit distillation from a
teacher), gradient accumulation, bf16 compute, the warm-start phases, and the jitted train and
eval steps on a mesh's shardings.

Pure functions of (params, optimizer state, batch): `loop.py` runs them, `bench/train.py` times them.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from bitnet_jax.model.transformer import BitNetLM, is_bitlinear_kernel
from bitnet_jax.train import sharding
from bitnet_jax.train.run_config import RunConfig


# The optimizer.
def learning_rate_schedule(run: RunConfig) -> optax.Schedule:
    """BitNet b1.58's two-stage schedule: warmup to `learning_rate`, cosine decay to half of it
    until `stage2_start`, then a drop to `stage2_learning_rate` and cosine decay to the floor."""
    stage2 = _stage2_step(run)
    warmup = optax.linear_schedule(0.0, run.learning_rate, max(run.warmup_steps, 1))
    stage1 = optax.cosine_decay_schedule(run.learning_rate, max(stage2 - run.warmup_steps, 1), alpha=0.5)
    stage2_decay = optax.cosine_decay_schedule(
        run.stage2_learning_rate,
        max(run.steps - stage2, 1),
        alpha=run.min_learning_rate / max(run.stage2_learning_rate, 1e-12),
    )
    return optax.join_schedules([warmup, stage1, stage2_decay], [run.warmup_steps, stage2])


def _stage2_step(run: RunConfig) -> int:
    return max(int(run.steps * run.stage2_start), run.warmup_steps + 1)


def weight_decay_schedule(run: RunConfig) -> optax.Schedule:
    stage2 = _stage2_step(run)
    return lambda step: jnp.where(step < stage2, run.weight_decay, 0.0)


def make_optimizer(run: RunConfig) -> optax.GradientTransformation:
    # Decay matrices (kernels, embeddings) only, not norm weights.
    decay_mask = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: path[-1].key in ("kernel", "embedding"), params
    )
    # `mask` is static: inject_hyperparams would otherwise take the callable for a schedule.
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=learning_rate_schedule(run),
        b1=run.adam_b1,
        b2=run.adam_b2,
        weight_decay=weight_decay_schedule(run),
        mask=decay_mask,
    )
    return optax.chain(optax.clip_by_global_norm(run.grad_clip), adamw)


# The step.
def compute_params(params, compute_dtype=jnp.float32):
    """The parameters as the forward pass sees them: cast to `compute_dtype`, except the BitLinear
    kernels, which stay in their (f32 master) dtype so that the absmean scales are f32 statistics;
    BitLinear casts its quantized weights to the activations' dtype itself."""
    if jnp.dtype(compute_dtype) == jnp.float32:
        return params
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p if is_bitlinear_kernel(path) else p.astype(compute_dtype), params
    )


@dataclasses.dataclass(frozen=True)
class Distillation:
    """Logit distillation from a fixed teacher (BitDistill, arXiv 2510.13998): the objective is
    (1 - weight) * CE + weight * T^2 * KL(softmax(teacher / T) || softmax(student / T)), the KL
    averaged over tokens; T^2 keeps the soft term's gradients on the scale of the CE's as T
    grows (Hinton et al. 2015). The teacher is any model of the same vocabulary."""

    model: BitNetLM  # the teacher's (its own architecture and quantization)
    temperature: float
    weight: float


def distillation_kl(student_logits_btv, teacher_logits_btv, temperature: float, loss_mask_bt=None) -> jax.Array:
    """T^2 * mean over tokens (the masked-in ones, with `loss_mask_bt`) of
    KL(softmax(teacher / T) || softmax(student / T)), in f32."""
    t = temperature
    teacher_logp_btv = jax.nn.log_softmax(teacher_logits_btv.astype(jnp.float32) / t, axis=-1)
    student_logp_btv = jax.nn.log_softmax(student_logits_btv.astype(jnp.float32) / t, axis=-1)
    kl_bt = jnp.sum(jnp.exp(teacher_logp_btv) * (teacher_logp_btv - student_logp_btv), axis=-1)
    return t * t * token_mean(kl_bt, loss_mask_bt)


def token_mean(x_bt, loss_mask_bt=None) -> jax.Array:
    """The mean of a per-token quantity over all tokens, or over those where `loss_mask_bt` is 1
    (chat data: the assistant tokens); 0 where the mask keeps none. With no mask it is exactly
    `jnp.mean`, so plain-text losses are unchanged."""
    if loss_mask_bt is None:
        return jnp.mean(x_bt)
    mask_bt = loss_mask_bt.astype(jnp.float32)
    return jnp.sum(x_bt * mask_bt) / jnp.maximum(jnp.sum(mask_bt), 1.0)


def training_loss(
    params,
    model: BitNetLM,
    batch,
    z_loss: float = 0.0,
    compute_dtype=jnp.float32,
    distill: Distillation | None = None,
    teacher_params=None,
) -> tuple[jax.Array, jax.Array]:
    """(objective, cross-entropy): the objective adds `z_loss * mean(logsumexp(logits)^2)`, and
    with `distill` mixes the cross-entropy with the distillation term (`Distillation`), the
    teacher's logits computed here from `teacher_params` (no gradient flows into them).

    A batch with a "loss_mask" (int [B, T], from chat data: 1 on assistant tokens) takes every
    mean over the masked-in targets only; a batch without one, over all of them.

    The cast to `compute_dtype` happens here, inside the differentiated function, so gradients
    flow back through it and reach the f32 master parameters in f32. Logits are f32 either way.
    """
    params = compute_params(params, compute_dtype)
    logits_btv = model.apply({"params": params}, batch["inputs"], segment_ids_bt=batch["segment_ids"])
    mask_bt = batch.get("loss_mask")
    ce = token_mean(optax.softmax_cross_entropy_with_integer_labels(logits_btv, batch["targets"]), mask_bt)
    objective = ce
    if distill is not None:
        teacher = jax.lax.stop_gradient(compute_params(teacher_params, compute_dtype))
        teacher_logits_btv = distill.model.apply(
            {"params": teacher}, batch["inputs"], segment_ids_bt=batch["segment_ids"]
        )
        kd = distillation_kl(logits_btv, teacher_logits_btv, distill.temperature, mask_bt)
        objective = (1.0 - distill.weight) * ce + distill.weight * kd
    if not z_loss:
        return objective, ce
    log_z_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    return objective + z_loss * token_mean(jnp.square(log_z_bt), mask_bt), ce


def make_train_step(
    model: BitNetLM,
    optimizer: optax.GradientTransformation,
    *,
    grad_accum_steps: int = 1,
    z_loss: float = 0.0,
    compute_dtype=jnp.float32,
    shardings: sharding.TrainShardings | None = None,
    donate: bool = False,
    distill: Distillation | None = None,
):
    """A jitted `(params, opt_state, batch) -> (params, opt_state, cross_entropy)`; with `distill`,
    `(params, opt_state, batch, teacher_params) -> ...` (the teacher's parameters an argument,
    not constants folded into the program; replicated on a mesh).

    With `grad_accum_steps = k > 1` the batch [B, T] is split into k micro-batches of B/k rows
    whose gradients are averaged (a `lax.scan`, so memory is that of one micro-batch); the update
    equals one step on the whole batch up to float summation order. With a "loss_mask", each
    micro-batch's mean is weighted by its share of the batch's masked-in tokens, so that the
    result is still the whole batch's mean over those tokens.

    With `shardings` (`sharding.train_shardings`) the step is compiled for their mesh: parameters
    and optimizer state stay in their shards, the batch comes in split over data x fsdp. Without,
    it runs on one device.

    With `donate`, the new parameters and optimizer state are written into the buffers of the old
    ones (no second copy of the model in memory): the arrays passed in are deleted by the call.
    """
    grad_fn = jax.value_and_grad(training_loss, has_aux=True)
    mesh = None if shardings is None else shardings.mesh

    def batch_grads(params, batch, teacher_params):
        if grad_accum_steps == 1:
            (_, ce), grads = grad_fn(params, model, batch, z_loss, compute_dtype, distill, teacher_params)
            return ce, grads
        # Micro-batch j holds rows j, j+k, j+2k, ...: the batch is split over devices in
        # contiguous blocks, so every device then holds an equal part of every micro-batch and
        # the scan moves no data between devices.
        micro = jax.tree.map(lambda x: x.reshape(-1, grad_accum_steps, *x.shape[1:]).swapaxes(0, 1), batch)
        micro = nn.with_logical_constraint(micro, jax.tree.map(lambda _: (None, "batch"), micro))

        if "loss_mask" in batch:
            # Micro-batch j's mean over its n_j masked-in tokens, times n_j / n: the batch's mean.
            counts_k = jnp.sum(micro["loss_mask"].astype(jnp.float32), axis=(1, 2))
            weights_k, divisor = counts_k / jnp.maximum(jnp.sum(counts_k), 1.0), 1.0
        else:  # the plain mean of the micro-batches' means (weights of 1 change no bit)
            weights_k, divisor = jnp.ones((grad_accum_steps,), jnp.float32), grad_accum_steps

        def accumulate(total, micro_batch_and_weight):
            micro_batch, weight = micro_batch_and_weight
            (_, ce), grads = grad_fn(params, model, micro_batch, z_loss, compute_dtype, distill, teacher_params)
            return jax.tree.map(lambda t, x: t + weight * x, total, (ce, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        total, _ = jax.lax.scan(accumulate, zeros, (micro, weights_k))
        return jax.tree.map(lambda x: x / divisor, total)

    def train_step(params, opt_state, batch, teacher_params=None):
        with sharding.activation_sharding(mesh):
            loss, grads = batch_grads(params, batch, teacher_params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = (
        train_step if distill is not None else (lambda params, opt_state, batch: train_step(params, opt_state, batch))
    )
    donate_argnums = (0, 1) if donate else ()
    if shardings is None:
        return jax.jit(step, donate_argnums=donate_argnums)
    s = shardings
    return jax.jit(
        step,
        in_shardings=(s.params, s.opt_state, s.batch, *((s.replicated,) if distill is not None else ())),
        out_shardings=(s.params, s.opt_state, s.replicated),
        donate_argnums=donate_argnums,
    )


def make_eval_step(model: BitNetLM, shardings: sharding.TrainShardings | None = None, compute_dtype=jnp.float32):
    """Held-out cross-entropy, computed as training computes it (the same compute dtype)."""
    mesh = None if shardings is None else shardings.mesh

    def eval_step(params, batch):
        with sharding.activation_sharding(mesh):
            return training_loss(params, model, batch, compute_dtype=compute_dtype)[1]

    if shardings is None:
        return jax.jit(eval_step)
    return jax.jit(eval_step, in_shardings=(shardings.params, shardings.batch), out_shardings=shardings.replicated)


def make_model(run: RunConfig, *, full_precision: bool = False) -> BitNetLM:
    """The run's model; with `full_precision`, the same network with its quantizers off (the same
    parameters): the warm-start phase's model."""
    config = run.model.replace(weight_quant="none", act_quant="none") if full_precision else run.model
    return BitNetLM(config, remat=run.remat, scan_layers=run.scan_layers)


def quant_switch_step(run: RunConfig) -> int:
    """Warm start (Nielsen et al. 2025, arXiv 2502.11895): steps 1 .. S train the full-precision
    model and steps S + 1 .. `steps` the quantized one, S = floor(quant_start * steps) (0: QAT
    from the first step)."""
    return int(run.quant_start * run.steps)
