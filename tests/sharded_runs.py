"""Training runs for test_sharding.py (shared by its two sides) and test_multiprocess.py, and the
comparisons both make.

The test process (one CPU device) runs the references; this file, run as a script with
`XLA_FLAGS=--xla_force_host_platform_device_count=8`, runs the same training on meshes of 8
simulated devices and writes what it saw to `<out>/results.npz` and `<out>/results.json`:

    python tests/sharded_runs.py OUT_DIR CORPUS_DIR
"""

import contextlib
import io
import json
import os
import shutil
import sys
import time

import jax
import numpy as np
import tiny_run
from near_ties import forward_with_quantizer_inputs

from bitnet_jax import BitNetLM, cli, init_params
from bitnet_jax.train import sharding
from bitnet_jax.train.run_config import load_run_config
from bitnet_jax.train.run_folder import load_run
from bitnet_jax.train.step import make_optimizer, make_train_step

# A model small enough to compile quickly, with every sharded size divisible by 8. lr 1e-3: at
# larger rates, float noise grows faster along the trajectory (see test_sharding.py).
MODEL = [
    *tiny_run.MODEL,
    "model.vocab_size=128",
    "model.initializer_range=0.1",
]  # logits of O(1) at init, so the loss sees the weights
STEP_SETTINGS = MODEL + ["seq_len=16", "batch_size=16", "warmup_steps=0", "learning_rate=1e-3", "steps=100"]
STEPS = 4

# (mesh, weight_quant, grad_accum_steps): every mesh of the task once (each case is a compile, the
# bulk of the time), each granularity on a mesh that splits the kernels' input axis, so that its
# absmean runs over a split axis: per tensor on (1, 2, 4), per channel on (2, 2, 2) (with
# micro-batches), per group on (1, 8, 1), where 64 inputs split 8 per device and every group of 16
# straddles two devices.
CASES = [((8, 1, 1), "tensor", 1), ((1, 8, 1), "group:16", 1), ((2, 2, 2), "channel", 2), ((1, 2, 4), "tensor", 1)]

# The end-to-end run through the CLI (train, interrupt, resume on another mesh): the shared tiny
# run with 8 rows per batch, so that it splits over 8 devices, at lr 1e-3 like the steps above.
CLI_SETTINGS = [*tiny_run.RUN, "batch_size=8", "eval_batches=1", "learning_rate=1e-3"]


def case_name(mesh, weight_quant, accum) -> str:
    return f"{'x'.join(map(str, mesh))}-{weight_quant}-accum{accum}"


def step_run(weight_quant: str):
    return load_run_config(None, STEP_SETTINGS + [f"model.weight_quant={weight_quant}"])


def batches(n: int = STEPS, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    shape = (16, 16)
    segments = np.repeat(np.array([[1] * 9 + [2] * 7]), 16, axis=0).astype(np.int32)  # two documents per row
    return [
        {
            "inputs": rng.integers(0, 128, shape, dtype=np.int32),
            "targets": rng.integers(0, 128, shape, dtype=np.int32),
            "segment_ids": segments,
        }
        for _ in range(n)
    ]


def train_steps(weight_quant: str, mesh_shape=None, grad_accum_steps: int = 1):
    """(losses [STEPS], final params, logits at init [B, T, V], quantizer inputs at init); one
    device when `mesh_shape` is None."""
    run = step_run(weight_quant)
    model, optimizer = BitNetLM(run.model), make_optimizer(run)
    data = batches()
    if mesh_shape is None:
        step = make_train_step(model, optimizer, grad_accum_steps=grad_accum_steps)
        params = init_params(run.model, run.seed)
        opt_state = optimizer.init(params)
        logits, sown = jax.jit(lambda p, ids: forward_with_quantizer_inputs(model, {"params": p}, ids))(
            params, data[0]["inputs"]
        )
        put = lambda batch: batch
    else:
        s = sharding.train_shardings(model, optimizer, sharding.make_mesh(mesh_shape))
        step = make_train_step(model, optimizer, grad_accum_steps=grad_accum_steps, shardings=s)
        params = sharding.init_sharded(model, run.seed, s.params)
        opt_state = jax.jit(optimizer.init, out_shardings=s.opt_state)(params)

        def forward(params, ids):
            with sharding.activation_sharding(s.mesh):
                return forward_with_quantizer_inputs(model, {"params": params}, ids)

        put = lambda batch: sharding.global_batch(batch, s.batch)
        logits, sown = jax.jit(forward, in_shardings=(s.params, s.batch))(params, put(data[0])["inputs"])
    losses = []
    for batch in data:
        params, opt_state, loss = step(params, opt_state, put(batch))
        losses.append(float(loss))
    return np.array(losses), params, np.asarray(logits), {k: np.asarray(v) for k, v in sown.items()}


def flat(params) -> dict[str, np.ndarray]:
    return {"/".join(k.key for k in path): np.asarray(v) for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def assert_same_training(params_init, params_ref, params_got):
    """The updates `p_final - p_init` of two runs agree to 10% relative L2.

    Legitimate differences: a ternary code that float noise flips at one step changes that
    step's gradients a little, and Adam spreads it (measured: 3% with per-tensor scales, 4e-5
    with per-channel and per-group ones). A wrong program trains on other numbers: the same
    model trained on other batches differs by ~80%.
    """
    ref, got, init = flat(params_ref), params_got, flat(params_init)
    assert set(got) == set(ref)
    update_ref = np.concatenate([(ref[k] - init[k]).ravel() for k in sorted(ref)])
    update_got = np.concatenate([(got[k] - init[k]).ravel() for k in sorted(ref)])
    assert np.linalg.norm(update_got - update_ref) < 0.1 * np.linalg.norm(update_ref)


def cli_args(corpus: str, out: str, *extra: str) -> list[str]:
    return [
        "train",
        "--no-progress",
        "--out",
        out,
        "--set",
        f"corpus={corpus}",
        *[a for s in [*CLI_SETTINGS, *extra] for a in ("--set", s)],
    ]


def cli_errors(corpus: str, out: str) -> dict[str, str]:
    """stderr of CLI calls with a bad mesh for 8 devices, and whether they wrote anything."""
    bad = {
        "mesh-product": ["mesh=(2,2,1)"],
        "mesh-wildcard": ["mesh=(3,-1,1)"],
        "batch": ["mesh=(8,1,1)", "batch_size=12"],
        "micro-batch": ["mesh=(2,2,2)", "grad_accum_steps=4"],
        "param": ["mesh=(1,1,8)", "model.intermediate_size=100"],
    }
    messages = {}
    for name, settings in bad.items():
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            status = cli.main(cli_args(corpus, os.path.join(out, name), *settings))
        messages[name] = {"status": status, "err": err.getvalue(), "wrote": os.path.exists(os.path.join(out, name))}
    return messages


def main(out: str, corpus: str):
    assert jax.device_count() == 8, jax.devices()
    arrays, results = {}, {"cases": {}}
    start = time.perf_counter()
    for mesh, weight_quant, accum in CASES:
        losses, params, logits, sown = train_steps(weight_quant, mesh, accum)
        print(f"{mesh} {weight_quant}: {time.perf_counter() - start:.1f} s", flush=True)
        name = case_name(mesh, weight_quant, accum)
        kernel = params["layers"]["mlp"]["up_proj"]["kernel"]
        results["cases"][name] = {
            "losses": losses.tolist(),
            "up_proj_shard_shape": list(kernel.addressable_shards[0].data.shape),
        }
        arrays[f"{name}/logits"] = logits
        arrays.update({f"{name}/sown/{k}": v for k, v in sown.items()})
        arrays.update({f"{name}/params/{k}": v for k, v in flat(params).items()})

    # Interrupted after step 3 on (8, 1, 1), resumed on (2, 2, 2) with the layers unrolled
    # (`scan_layers` changes the program, not the parameters or the arithmetic).
    run_dir = os.path.join(out, "resumed")
    assert cli.main(cli_args(corpus, run_dir, "mesh=(8,1,1)")) == 0
    shutil.rmtree(os.path.join(run_dir, "checkpoints", "6"))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(cli_args(corpus, run_dir, "mesh=(2,2,2)", "scan_layers=False")) == 0
    results["resume_printed"] = printed.getvalue()
    print(f"resumed: {time.perf_counter() - start:.1f} s", flush=True)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        results["resumed_metrics"] = [json.loads(line) for line in f]
    _, params, _ = load_run(run_dir)
    arrays.update({f"resumed/params/{k}": v for k, v in flat(params).items()})

    results["errors"] = cli_errors(corpus, os.path.join(out, "errors"))
    np.savez(os.path.join(out, "results.npz"), **arrays)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
