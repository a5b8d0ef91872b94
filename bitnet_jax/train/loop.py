"""Training from scratch on a mesh of devices: data, optimizer, the train step, checkpoints, metrics.

`RunConfig.mesh` = (data, fsdp, tensor) sizes the device mesh (`sharding.py`); the default uses
every device for data parallelism, which on one device is plain single-device training.

A run folder is self-contained:
  run.json          the RunConfig (model config included)
  tokenizer.model   the tokenizer the data was encoded with (or tokenizer.json, see corpus.py)
  checkpoints/N/    orbax checkpoints: `params`, `opt_state` and `meta` (step, data iterator state),
                    saved every `checkpoint_every` steps in the background (`async_checkpoints`);
                    a save is written to `N.orbax-checkpoint-tmp` and renamed to `N` when complete
  metrics.jsonl     one JSON object per logged step: step, loss, learning_rate, tokens_per_s,
                    and eval_loss where evaluated
  loss.png          train and eval loss curves
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import threading
import time
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from bitnet_jax.data import pipeline as data
from bitnet_jax.data.tokenizer import copy_tokenizer, load_tokenizer
from bitnet_jax.errors import BitNetError
from bitnet_jax.model.transformer import BitNetLM, init_params, is_bitlinear_kernel
from bitnet_jax.train import sharding
from bitnet_jax.train.corpus import Corpus, check_run_tokenizer, prepare_corpus
from bitnet_jax.train.run_config import RunConfig

RUN_FILE = "run.json"


# Optimizer.
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


def training_loss(
    params, model: BitNetLM, batch, z_loss: float = 0.0, compute_dtype=jnp.float32
) -> tuple[jax.Array, jax.Array]:
    """(objective, cross-entropy): the objective adds `z_loss * mean(logsumexp(logits)^2)`.

    The cast to `compute_dtype` happens here, inside the differentiated function, so gradients
    flow back through it and reach the f32 master parameters in f32. Logits are f32 either way.
    """
    params = compute_params(params, compute_dtype)
    logits_btv = model.apply({"params": params}, batch["inputs"], segment_ids_bt=batch["segment_ids"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_btv, batch["targets"]).mean()
    if not z_loss:
        return ce, ce
    log_z_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    return ce + z_loss * jnp.mean(jnp.square(log_z_bt)), ce


def make_train_step(
    model: BitNetLM,
    optimizer: optax.GradientTransformation,
    *,
    grad_accum_steps: int = 1,
    z_loss: float = 0.0,
    compute_dtype=jnp.float32,
    shardings: sharding.TrainShardings | None = None,
    donate: bool = False,
):
    """A jitted `(params, opt_state, batch) -> (params, opt_state, cross_entropy)`.

    With `grad_accum_steps = k > 1` the batch [B, T] is split into k micro-batches of B/k rows
    whose gradients are averaged (a `lax.scan`, so memory is that of one micro-batch); the update
    equals one step on the whole batch up to float summation order.

    With `shardings` (`sharding.train_shardings`) the step is compiled for their mesh: parameters
    and optimizer state stay in their shards, the batch comes in split over data x fsdp. Without,
    it runs on one device.

    With `donate`, the new parameters and optimizer state are written into the buffers of the old
    ones (no second copy of the model in memory): the arrays passed in are deleted by the call.
    """
    grad_fn = jax.value_and_grad(training_loss, has_aux=True)
    mesh = None if shardings is None else shardings.mesh

    def batch_grads(params, batch):
        if grad_accum_steps == 1:
            (_, ce), grads = grad_fn(params, model, batch, z_loss, compute_dtype)
            return ce, grads
        # Micro-batch j holds rows j, j+k, j+2k, ...: the batch is split over devices in
        # contiguous blocks, so every device then holds an equal part of every micro-batch and
        # the scan moves no data between devices.
        micro = jax.tree.map(lambda x: x.reshape(-1, grad_accum_steps, *x.shape[1:]).swapaxes(0, 1), batch)
        micro = nn.with_logical_constraint(micro, jax.tree.map(lambda _: (None, "batch"), micro))

        def accumulate(total, micro_batch):
            (_, ce), grads = grad_fn(params, model, micro_batch, z_loss, compute_dtype)
            return jax.tree.map(jnp.add, total, (ce, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        total, _ = jax.lax.scan(accumulate, zeros, micro)
        return jax.tree.map(lambda x: x / grad_accum_steps, total)

    def train_step(params, opt_state, batch):
        with sharding.activation_sharding(mesh):
            loss, grads = batch_grads(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    donate_argnums = (0, 1) if donate else ()
    if shardings is None:
        return jax.jit(train_step, donate_argnums=donate_argnums)
    s = shardings
    return jax.jit(
        train_step,
        in_shardings=(s.params, s.opt_state, s.batch),
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


def make_model(run: RunConfig) -> BitNetLM:
    return BitNetLM(run.model, remat=run.remat)


# The loop.
def train(
    run: RunConfig, out_dir: str, *, cache_dir: str | None = None, progress: bool = True, corpus: Corpus | None = None
) -> dict:
    """Trains from scratch (or resumes from the latest checkpoint in `out_dir`); returns final metrics.

    `corpus` (from `prepare_corpus`) lets several runs share one tokenizer and token stream, as
    an ablation's runs must; its tokenizer is copied into the run folder.
    """
    # The mesh and the shardings are checked before anything is written.
    mesh = sharding.make_mesh(run.mesh)
    sharding.check_batch(run.batch_size, run.grad_accum_steps, mesh)
    model = make_model(run)
    optimizer = make_optimizer(run)
    shardings = sharding.train_shardings(model, optimizer, mesh)

    # With several processes (multi-host), process 0 alone writes the run folder; the others read
    # the tokenizer and token cache after it has made them.
    primary = jax.process_index() == 0
    say = print if primary else (lambda *args, **kwargs: None)
    cache_dir = cache_dir or default_cache_dir()
    os.makedirs(out_dir, exist_ok=True)
    _write_or_check_run_file(run, out_dir, write=False)  # every process refuses a mismatched folder
    _sync("run folder checked")

    def prepare():
        if primary:
            _write_or_check_run_file(run, out_dir)
        if corpus is None:
            return prepare_corpus(run, out_dir, cache_dir)
        check_run_tokenizer(corpus.tokenizer, run)
        if primary:
            copy_tokenizer(corpus.tokenizer, out_dir)
        return corpus

    corpus = _primary_first(prepare)

    # Donation is safe beside background checkpoint writes: orbax's `save` copies the arrays to
    # host memory before it returns. On CPU that copy is a numpy view of the device buffer (zero
    # copy), and XLA does not donate a buffer that a view still references: the step after a save
    # writes new buffers instead. tests/test_kill_resume.py checks that a save followed by donated
    # steps restores the saved values.
    train_step = make_train_step(
        model,
        optimizer,
        grad_accum_steps=run.grad_accum_steps,
        z_loss=run.z_loss,
        compute_dtype=run.compute_dtype,
        shardings=shardings,
        donate=True,
    )
    eval_step = make_eval_step(model, shardings, run.compute_dtype)
    eos_id = corpus.tokenizer.eos_id
    # Every process reads the same global batches (shard_count=1) and hands its own rows to its
    # devices (sharding.global_batch); the iterator state is then the same on every process.
    train_iter = data.make_train_iterator(
        corpus.train_tokens,
        run.seq_len,
        run.batch_size,
        run.seed,
        weights=corpus.weights,
        names=corpus.names,
        eos_id=eos_id,
        worker_count=run.worker_count,
        shard_index=0,
        shard_count=1,
    )
    eval_batches = [
        sharding.global_batch(batch, shardings.batch)
        for batch in data.make_eval_batches(
            corpus.eval_tokens, run.seq_len, run.batch_size, run.eval_batches, eos_id=eos_id
        )
    ]

    unfinished = _unfinished_saves(out_dir)
    manager = _checkpoint_manager(out_dir, run)  # deletes the unfinished saves before its first save
    if unfinished:
        then = (
            "the newest complete one is used"
            if manager.latest_step() is not None
            else "there is no complete one: training starts from step 0"
        )
        say(
            f"The checkpoint of step {', '.join(map(str, unfinished))} is incomplete (the run stopped while "
            f"saving it) and is deleted; {then}."
        )
    step = 0
    if manager.latest_step() is None:
        params = sharding.init_sharded(model, run.seed, shardings.params)
        opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
    else:
        # Restored straight into this run's shardings, whatever mesh the checkpoint was saved from.
        params_like = _abstract(jax.eval_shape(lambda: init_params(run.model)), shardings.params)
        opt_state_like = _abstract(jax.eval_shape(optimizer.init, params_like), shardings.opt_state)
        params, opt_state, step, iter_state, bad_steps = restore_checkpoint(
            manager, out_dir, params_like, opt_state_like
        )
        if bad_steps:  # set them aside, so that this run can save those steps again
            if primary:
                _set_aside(out_dir, bad_steps)
            _sync("corrupt checkpoints set aside")
            manager = _checkpoint_manager(out_dir, run)  # re-reads the steps
        train_iter.set_state(iter_state)
        say(f"Resumed from step {step} in {out_dir}")

    evaluate = lambda: float(np.mean([eval_step(params, batch) for batch in eval_batches]))
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    history = _read_metrics(metrics_path, up_to=step) if primary else []
    record = (lambda r: (history.append(r), _append_metrics(metrics_path, r))) if primary else (lambda r: None)
    tokens_per_step = run.batch_size * run.seq_len
    schedule = learning_rate_schedule(run)
    bar = _progress_bar(run.steps, step, progress and primary)
    last, stopping = {}, False
    with _StopSignals() as stop:
        try:
            if step == 0:
                last = {"step": 0, "eval_loss": evaluate()}
                record(last)
            window_start, window_steps = time.perf_counter(), 0
            while step < run.steps and not stopping:
                batch = sharding.global_batch(next(train_iter), shardings.batch)
                params, opt_state, loss = train_step(params, opt_state, batch)
                step += 1
                window_steps += 1
                if step % run.log_every == 0 or step == run.steps or step % run.eval_every == 0:
                    loss = float(loss)
                    if not np.isfinite(loss):
                        raise BitNetError(f"The loss became {loss} at step {step}: lower learning_rate and retry.")
                    elapsed = time.perf_counter() - window_start
                    last = {
                        "step": step,
                        "loss": loss,
                        "learning_rate": float(schedule(step)),
                        "tokens_per_s": window_steps * tokens_per_step / max(elapsed, 1e-9),
                    }
                    if step % run.eval_every == 0 or step == run.steps:
                        last["eval_loss"] = evaluate()
                    record(last)
                    bar.set_postfix(
                        loss=f"{loss:.3f}",
                        tok_s=f"{last['tokens_per_s']:.0f}",
                        **({"eval": f"{last['eval_loss']:.3f}"} if "eval_loss" in last else {}),
                    )
                    window_start, window_steps = time.perf_counter(), 0
                bar.update(1)
                if step % run.checkpoint_every == 0 or step == run.steps:
                    save_checkpoint(manager, step, params, opt_state, train_iter.get_state())
                stopping = _stop_agreed(stop.requested, step, run.log_every)
            if stopping or (stop.requested and jax.process_count() == 1):
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            bar.close()
            if any(x.is_deleted() for x in jax.tree.leaves((params, opt_state))):
                # A second Ctrl-C inside the step: its inputs were donated, its outputs are lost.
                say(f"\nInterrupted during step {step + 1}: not saved; the newest checkpoint is kept.")
                raise
            say(f"\nInterrupted at step {step}: saving a checkpoint...")
            save_checkpoint(manager, step, params, opt_state, train_iter.get_state())
            manager.wait_until_finished()
            say(f"Saved; run `bitnet-jax train` with --out {out_dir} again to resume.")
            raise
        finally:
            bar.close()
            train_iter.close()  # stops grain's prefetch thread and worker processes now, not at exit
            manager.wait_until_finished()
            if primary:
                plot_losses(history, os.path.join(out_dir, "loss.png"))
    return last


def _sync(name: str):
    """A barrier across processes (nothing on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _primary_first(fn):
    """`fn()` on process 0, then on the others, which then find the files it wrote."""
    if jax.process_index() == 0:
        result = fn()
        _sync("process 0 first")
        return result
    _sync("process 0 first")
    return fn()


def _stop_agreed(requested: bool, step: int, every: int) -> bool:
    """Whether to stop after this step. Processes must stop at the same step (a checkpoint is a
    collective save), so with several they agree every `every` steps: any request stops all."""
    if jax.process_count() == 1:
        return requested
    if step % every:
        return False
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array(requested))))


class _StopSignals:
    """Turns the first Ctrl-C (SIGINT) or SIGTERM into a request that the loop sees between steps,
    so the checkpoint saved on the way out holds a consistent step; a second Ctrl-C interrupts at
    once. (A KeyboardInterrupt raised inside JAX or numpy code can surface as another exception.)
    Outside the main thread, where handlers cannot be installed, Ctrl-C stays a KeyboardInterrupt."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _abstract(tree, shardings):
    """Shapes and dtypes of `tree` placed by `shardings`: what orbax restores into."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def save_checkpoint(manager, step, params, opt_state, iter_state):
    """Starts saving `step` (in the background with async checkpoints; `manager.save` returns
    once the arrays are copied to host memory, and waits for the previous save first).

    This is all a resumed run needs to continue bit for bit: the train step draws no random
    numbers (no dropout), the seed is in run.json, and the data order is the iterator state."""
    if step in (manager.all_steps() or []):
        return
    manager.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave({"step": int(step), "data_iterator": _jsonable(iter_state)}),
        ),
    )


def restore_checkpoint(manager, run_dir, params_like, opt_state_like):
    """(params, opt_state, step, data-iterator state, unreadable newer steps) of the newest good checkpoint."""
    args = ocp.args.Composite(
        params=ocp.args.StandardRestore(params_like),
        opt_state=ocp.args.StandardRestore(opt_state_like),
        meta=ocp.args.JsonRestore(),
    )
    restored, bad_steps = _restore_newest_good(manager, run_dir, args)
    return (restored.params, restored.opt_state, int(restored.meta["step"]), restored.meta["data_iterator"], bad_steps)


def _restore_newest_good(manager, run_dir: str, args):
    """Restores the newest checkpoint that reads back; newer corrupt or incomplete ones (a run
    killed mid-save, a disk error) are skipped with a warning that names their step."""
    bad_steps = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            return manager.restore(step, args=args), bad_steps
        except Exception as e:  # orbax / tensorstore raise many types for damaged files
            warnings.warn(
                f"{run_dir}: the checkpoint of step {step} is corrupt or incomplete "
                f"({type(e).__name__}: {str(e)[:200]}); trying an earlier one.",
                stacklevel=2,
            )
            bad_steps.append(step)
    raise BitNetError(
        f"{run_dir}: none of its checkpoints (steps {bad_steps}) can be read. Restore the "
        "checkpoints folder from a backup, or delete it to train from scratch."
    )


def _unfinished_saves(out_dir: str) -> list[int]:
    """Steps whose save was cut short (the process was killed): orbax writes a checkpoint to
    `<step>.orbax-checkpoint-tmp` and renames it to `<step>` only when it is complete."""
    directory = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    names = ocp.path.step.tmp_checkpoints(directory)
    return sorted(int(m.group(1)) for name in names if (m := re.match(ocp.path.step.TMP_DIR_STEP_PATTERN, name)))


def _set_aside(out_dir: str, bad_steps: list[int]):
    """Moves unreadable checkpoints to `corrupt-checkpoints/<step>-<time>` (kept for inspection)."""
    aside = os.path.join(out_dir, "corrupt-checkpoints")
    os.makedirs(aside, exist_ok=True)
    for bad in bad_steps:
        shutil.move(
            os.path.join(out_dir, "checkpoints", str(bad)),
            os.path.join(aside, f"{bad}-{time.strftime('%Y%m%d-%H%M%S')}"),
        )
    print(f"Moved unreadable checkpoint(s) {bad_steps} to {aside}")


def load_run(run_dir: str):
    """(RunConfig, params, tokenizer) of the newest readable checkpoint of a run folder."""
    run = read_run_file(run_dir)
    manager = _checkpoint_manager(run_dir, run, read_only=True)
    if manager.latest_step() is None:
        raise BitNetError(
            f"Run folder {run_dir} has no checkpoint yet: train it first (bitnet-jax train --out {run_dir})."
        )
    # On this process's first device, whatever mesh the run was trained on.
    one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.eval_shape(lambda: init_params(run.model))
    abstract = _abstract(abstract, jax.tree.map(lambda _: one_device, abstract))
    restored, _ = _restore_newest_good(manager, run_dir, ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))
    return run, restored.params, load_tokenizer(run_dir)


def is_run_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, RUN_FILE))


def read_run_file(run_dir: str) -> RunConfig:
    path = os.path.join(run_dir, RUN_FILE)
    try:
        with open(path) as f:
            values = json.load(f)
    except FileNotFoundError:
        raise BitNetError(f"{run_dir} is not a bitnet-jax run folder (no {RUN_FILE}).") from None
    except json.JSONDecodeError as e:
        raise BitNetError(f"{path} is not valid JSON ({e}).") from None
    return RunConfig.from_dict(values, source=path)


def _write_or_check_run_file(run: RunConfig, out_dir: str, write: bool = True):
    path = os.path.join(out_dir, RUN_FILE)
    if os.path.isfile(path):
        previous = read_run_file(out_dir)
        if previous.model != run.model:
            changed = [k for k, v in run.model.to_dict().items() if previous.model.to_dict()[k] != v]
            raise BitNetError(
                f"{out_dir} holds a run with a different model (fields {changed} differ): use another --out "
                "folder to start a new run, or the same config to resume."
            )
    if write:  # a temporary file renamed into place: a run killed here leaves the old file or the new one
        with open(path + ".tmp", "w") as f:
            json.dump(run.to_dict(), f, indent=2)
        os.replace(path + ".tmp", path)


def _checkpoint_manager(out_dir: str, run: RunConfig, read_only: bool = False) -> ocp.CheckpointManager:
    directory = os.path.abspath(os.path.join(out_dir, "checkpoints"))
    if not read_only:
        # cleanup_tmp_directories: a save cut short leaves `<step>.orbax-checkpoint-tmp`, which
        # orbax never lists as a step, and otherwise deletes only when it saves that step again
        # (never, for the save on Ctrl-C at a step between `checkpoint_every` boundaries).
        options = ocp.CheckpointManagerOptions(
            max_to_keep=run.keep_checkpoints,
            create=True,
            enable_async_checkpointing=run.async_checkpoints,
            cleanup_tmp_directories=True,
        )
        return ocp.CheckpointManager(directory, options=options)
    # Read-only (loading a run, safe while it trains): orbax warns about each of these settings
    # and about read-only mode itself; none of that is news to the user.
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0, max_to_keep=None)
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        return ocp.CheckpointManager(directory, options=options)
    finally:
        absl_logger.setLevel(level)


def default_cache_dir() -> str:
    base = os.environ.get("BITNET_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "bitnet_jax"
    )
    os.makedirs(base, exist_ok=True)
    return base


def _jsonable(state):
    if isinstance(state, dict):
        return {k: _jsonable(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return [_jsonable(v) for v in state]
    if isinstance(state, bytes):
        return state.decode()
    if isinstance(state, np.generic):
        return state.item()
    return state


def _append_metrics(path: str, record: dict):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _read_metrics(path: str, up_to: int) -> list[dict]:
    """Metrics logged before a resume point; later lines (lost work) are dropped from the file,
    and so is a last line cut short by a kill."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise BitNetError(
                    f"{path}, line {i + 1} is not JSON ({line[:80]!r}): fix or delete that line, then run again."
                ) from None
    records = [r for r in records if r["step"] <= up_to]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return records


def plot_losses(history: list[dict], path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)
