"""A run folder on disk: its run file, orbax checkpoints, metrics and loss plot.

  run.json          the RunConfig (model config included)
  tokenizer.model   the tokenizer the data was encoded with (or tokenizer.json, see corpus.py)
  checkpoints/N/    orbax checkpoints: `params`, `opt_state` and `meta` (step, data iterator state),
                    saved every `checkpoint_every` steps in the background (`async_checkpoints`);
                    a save is written to `N.orbax-checkpoint-tmp` and renamed to `N` when complete
  metrics.jsonl     one JSON object per logged step: step, loss, learning_rate, tokens_per_s,
                    and eval_loss where evaluated
  loss.png          train and eval loss curves

`load_run` reads a finished (or running) folder back; `loop.train` writes it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import warnings
from typing import TYPE_CHECKING

import jax
import numpy as np

from bitnet_jax.data.tokenizer import load_tokenizer
from bitnet_jax.errors import BitNetError
from bitnet_jax.model.transformer import init_params
from bitnet_jax.train.run_config import RunConfig

if TYPE_CHECKING:
    import orbax.checkpoint as ocp

RUN_FILE = "run.json"


def _orbax():
    """orbax.checkpoint, imported when a checkpoint is first touched: serving a packed or Hugging
    Face folder imports this module but never needs orbax (nor its tensorstore, ~20 MB resident)."""
    import orbax.checkpoint

    return orbax.checkpoint


def abstract_like(tree, shardings):
    """Shapes and dtypes of `tree` placed by `shardings`: what orbax restores into."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def save_checkpoint(manager, step, params, opt_state, iter_state):
    """Starts saving `step` (in the background with async checkpoints; `manager.save` returns
    once the arrays are copied to host memory, and waits for the previous save first).

    This is all a resumed run needs to continue bit for bit: the train step draws no random
    numbers (no dropout), the seed is in run.json, and the data order is the iterator state."""
    ocp = _orbax()
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
    ocp = _orbax()
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


def unfinished_saves(out_dir: str) -> list[int]:
    """Steps whose save was cut short (the process was killed): orbax writes a checkpoint to
    `<step>.orbax-checkpoint-tmp` and renames it to `<step>` only when it is complete."""
    ocp = _orbax()
    directory = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    names = ocp.path.step.tmp_checkpoints(directory)
    return sorted(int(m.group(1)) for name in names if (m := re.match(ocp.path.step.TMP_DIR_STEP_PATTERN, name)))


def set_aside(out_dir: str, bad_steps: list[int]):
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
    ocp = _orbax()
    run = read_run_file(run_dir)
    manager = checkpoint_manager(run_dir, run, read_only=True)
    if manager.latest_step() is None:
        raise BitNetError(
            f"Run folder {run_dir} has no checkpoint yet: train it first (bitnet-jax train --out {run_dir})."
        )
    # On this process's first device, whatever mesh the run was trained on.
    one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.eval_shape(lambda: init_params(run.model))
    abstract = abstract_like(abstract, jax.tree.map(lambda _: one_device, abstract))
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


def write_or_check_run_file(run: RunConfig, out_dir: str, write: bool = True):
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


def checkpoint_manager(out_dir: str, run: RunConfig, read_only: bool = False) -> ocp.CheckpointManager:
    ocp = _orbax()
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


def append_metrics(path: str, record: dict):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path: str, up_to: int) -> list[dict]:
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
