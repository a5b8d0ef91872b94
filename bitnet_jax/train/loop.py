"""Training on a mesh of devices: the loop that feeds batches to the train step (`step.py`), evaluates,
logs and checkpoints into a run folder (`run_folder.py`), and stops cleanly on Ctrl-C or SIGTERM.

`RunConfig.mesh` = (data, fsdp, tensor) sizes the device mesh (`sharding.py`); the default uses
every device for data parallelism, which on one device is plain single-device training.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import jax
import numpy as np

from bitnet_jax.data import pipeline as data
from bitnet_jax.data.tokenizer import copy_tokenizer
from bitnet_jax.errors import BitNetError
from bitnet_jax.model.transformer import BitNetLM, init_params
from bitnet_jax.train import sharding
from bitnet_jax.train.corpus import Corpus, check_run_tokenizer, prepare_corpus
from bitnet_jax.train.run_config import RunConfig
from bitnet_jax.train.run_folder import (
    abstract_like,
    append_metrics,
    checkpoint_manager,
    default_cache_dir,
    plot_losses,
    read_metrics,
    restore_checkpoint,
    save_checkpoint,
    set_aside,
    unfinished_saves,
    write_or_check_run_file,
)
from bitnet_jax.train.step import (
    Distillation,
    learning_rate_schedule,
    make_eval_step,
    make_model,
    make_optimizer,
    make_train_step,
    quant_switch_step,
)


def train(
    run: RunConfig,
    out_dir: str,
    *,
    cache_dir: str | None = None,
    progress: bool = True,
    corpus: Corpus | None = None,
    initial_params: dict | None = None,
    teacher: tuple | None = None,
) -> dict:
    """Trains from scratch, or from `initial_params`, or resumes from the latest checkpoint in
    `out_dir`; returns final metrics.

    `corpus` (from `prepare_corpus`) lets several runs share one tokenizer and token stream, as
    an ablation's runs must; its tokenizer is copied into the run folder. `initial_params`:
    training parameters of `run.model` to start from (fine-tuning, `run.init`; see
    `serve.load.load_training_model`), used when `out_dir` has no checkpoint yet. `teacher`:
    (BitNetConfig, training parameters) of the model `run.teacher` names, for distillation.
    """
    # The mesh and the shardings are checked before anything is written.
    mesh = sharding.make_mesh(run.mesh)
    sharding.check_batch(run.batch_size, run.grad_accum_steps, mesh)
    model = make_model(run)
    optimizer = make_optimizer(run)
    shardings = sharding.train_shardings(model, optimizer, mesh)
    distill, teacher_args = _distillation(run, teacher, shardings.replicated)

    # With several processes (multi-host), process 0 alone writes the run folder; the others read
    # the tokenizer and token cache after it has made them.
    primary = jax.process_index() == 0
    say = print if primary else (lambda *args, **kwargs: None)
    cache_dir = cache_dir or default_cache_dir()
    os.makedirs(out_dir, exist_ok=True)
    write_or_check_run_file(run, out_dir, write=False)  # every process refuses a mismatched folder
    _sync("run folder checked")

    def prepare():
        if primary:
            write_or_check_run_file(run, out_dir)
        if corpus is None:
            return prepare_corpus(run, out_dir, cache_dir)
        check_run_tokenizer(corpus.tokenizer, run)
        if primary:
            copy_tokenizer(corpus.tokenizer, out_dir)
        return corpus

    corpus = _primary_first(prepare)

    train_step, eval_step = _phase_steps(run, model, optimizer, shardings, distill)
    train_iter, eval_batches, eval_weights = _batches(run, corpus, shardings)
    manager, params, opt_state, step = _start_state(
        run, out_dir, model, optimizer, shardings, train_iter, initial_params, say
    )

    evaluate = lambda: float(
        np.average([eval_step(step)(params, batch) for batch in eval_batches], weights=eval_weights)
    )
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    history = read_metrics(metrics_path, up_to=step) if primary else []
    record = (lambda r: (history.append(r), append_metrics(metrics_path, r))) if primary else (lambda r: None)
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
                params, opt_state, loss = train_step(step)(params, opt_state, batch, *teacher_args)
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


def _phase_steps(run: RunConfig, model, optimizer, shardings, distill):
    """(train_step(done), eval_step(done)): the compiled steps for the step after `done` steps and
    for evaluating after `done` steps.

    Warm start: the full-precision model trains steps 1 .. switch, the quantized one the rest; one
    compiled step each (the phase's model is static in its program), the same parameters,
    optimizer state and schedules throughout, so a resume on either side of the switch picks the
    step the uninterrupted run would. Evaluations use the model that trained the step.

    Donation is safe beside background checkpoint writes: orbax's `save` copies the arrays to
    host memory before it returns. On CPU that copy is a numpy view of the device buffer (zero
    copy), and XLA does not donate a buffer that a view still references: the step after a save
    writes new buffers instead. tests/test_kill_resume.py checks that a save followed by donated
    steps restores the saved values.
    """
    switch = quant_switch_step(run)
    phase_models = [model] if switch == 0 else [make_model(run, full_precision=True), model]
    train_steps = [
        make_train_step(
            m,
            optimizer,
            grad_accum_steps=run.grad_accum_steps,
            z_loss=run.z_loss,
            compute_dtype=run.compute_dtype,
            shardings=shardings,
            donate=True,
            distill=distill,
        )
        for m in phase_models
    ]
    eval_steps = [make_eval_step(m, shardings, run.compute_dtype) for m in phase_models]
    train_step = lambda done: train_steps[0 if done < switch else -1]
    eval_step = lambda done: eval_steps[0 if done <= switch else -1]
    return train_step, eval_step


def _batches(run: RunConfig, corpus: Corpus, shardings):
    """(the training batch iterator, the held-out batches on the mesh, their weights or None)."""
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
    host_eval_batches = data.make_eval_batches(
        corpus.eval_tokens, run.seq_len, run.batch_size, run.eval_batches, eos_id=eos_id
    )
    eval_batches = [sharding.global_batch(batch, shardings.batch) for batch in host_eval_batches]
    # With a loss mask (chat data) a batch's loss is the mean over its masked-in targets: weighting
    # the batches by their counts makes the held-out loss the mean over all of them.
    counts = [int(np.sum(b["loss_mask"])) for b in host_eval_batches if "loss_mask" in b]
    eval_weights = counts if counts and sum(counts) > 0 else None
    return train_iter, eval_batches, eval_weights


def _start_state(run: RunConfig, out_dir: str, model, optimizer, shardings, train_iter, initial_params, say):
    """(checkpoint manager, params, opt_state, steps done): restored from the newest complete
    checkpoint in `out_dir` (the data iterator with them), else `initial_params`, else a fresh
    initialization."""
    primary = jax.process_index() == 0
    unfinished = unfinished_saves(out_dir)
    manager = checkpoint_manager(out_dir, run)  # deletes the unfinished saves before its first save
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
    if manager.latest_step() is None:
        if initial_params is not None:
            params = _placed(initial_params, run, shardings.params)
            say(f"Starting from {run.init or 'the given parameters'}")
        elif run.init:
            raise BitNetError(
                f"This run starts from {run.init}: pass its parameters (bitnet-jax train --init {run.init})."
            )
        else:
            params = sharding.init_sharded(model, run.seed, shardings.params)
        opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
        return manager, params, opt_state, 0
    # Restored straight into this run's shardings, whatever mesh the checkpoint was saved from.
    params_like = abstract_like(jax.eval_shape(lambda: init_params(run.model)), shardings.params)
    opt_state_like = abstract_like(jax.eval_shape(optimizer.init, params_like), shardings.opt_state)
    params, opt_state, step, iter_state, bad_steps = restore_checkpoint(manager, out_dir, params_like, opt_state_like)
    if bad_steps:  # set them aside, so that this run can save those steps again
        if primary:
            set_aside(out_dir, bad_steps)
        _sync("corrupt checkpoints set aside")
        manager = checkpoint_manager(out_dir, run)  # re-reads the steps
    train_iter.set_state(iter_state)
    say(f"Resumed from step {step} in {out_dir}")
    return manager, params, opt_state, step


def _distillation(run: RunConfig, teacher, replicated) -> tuple[Distillation | None, tuple]:
    """(the step's Distillation, its extra arguments: the teacher's parameters, replicated)."""
    if not run.teacher:
        return None, ()
    if teacher is None:
        raise BitNetError(
            f"This run distills from {run.teacher}: pass its model (bitnet-jax train loads it from "
            "--set teacher=...; from Python, train(..., teacher=(config, params)))."
        )
    config, params = teacher
    if config.vocab_size != run.model.vocab_size:
        raise BitNetError(
            f"teacher={run.teacher}: its vocabulary has {config.vocab_size} tokens and the student's "
            f"{run.model.vocab_size}; distillation compares the two distributions token by token, so both "
            "must use the same tokenizer. Pick a teacher trained with this run's tokenizer."
        )
    params = jax.tree.map(lambda x: jax.device_put(np.asarray(x, np.float32), replicated), params)
    # The teacher runs forward only: no remat, its own architecture and quantization.
    return Distillation(BitNetLM(config), run.kd_temperature, run.kd_weight), (params,)


def _placed(params, run: RunConfig, shardings) -> dict:
    """Training parameters checked against `run.model`'s tree and placed by `shardings` (f32)."""
    expected = jax.eval_shape(lambda: init_params(run.model))
    want = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(expected)[0]}
    got = {jax.tree_util.keystr(p): np.shape(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    if want != got:
        wrong = sorted(set(want.items()) ^ set(got.items()))[:4]
        raise BitNetError(f"The initial parameters do not fit the run's model config: {wrong} differ.")
    return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x, np.float32), s), params, shardings)


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


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)
