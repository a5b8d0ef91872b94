"""Sharded training on meshes of 8 simulated CPU devices equals training on one device.

The sharded runs happen in a subprocess (`sharded_runs.py`, with
`XLA_FLAGS=--xla_force_host_platform_device_count=8`), so this process and the rest of the suite
keep one device; the one-device references run here while it works.

What may differ. Sharding changes only the order of float sums (a dot product or a mean split over
devices is summed in pieces), and which order XLA picks also depends on the CPU's vector width. A
ternary weight or int8 activation whose unrounded value sits within that noise of a .5 boundary
rounds the other way in one of the runs: a quantization step, not float noise, and how many such
near-ties a run meets is a property of the CPU, not of the code. So no test here counts tokens
within a tolerance. Instead:
  * the forward pass at init (same parameters) is followed layer by layer, and every difference
    beyond float noise must be explained by a code that flipped at a near-tie, checked as such
    (`near_ties.assert_same_forward`);
  * the loss curve over 4 steps agrees to 2e-3: a flipped code moves its token's loss by about a
    quantization step, and Adam spreads near-zero gradients' sign noise into +-lr updates
    (measured: up to 9e-4 apart after 4 steps at lr 1e-3), while the loss falls by ~1.5%;
  * the parameter updates agree to 10% relative L2 (`sharded_runs.assert_same_training`).
Planted bugs fail `near_ties.assert_same_forward` at its first check (layer 0, q_proj), each measured:
parameters initialized with another key (init_sharded(seed + 1)), the batch rows handed to the
devices in the wrong order (global_batch of x[::-1]), and the per-tensor absmean taken over one of
two fsdp shards of K. On the clean runs, 94-98% of the tokens meet no flipped code.
A ternary weight flips only if the scale moves by its relative margin to a boundary: at init
the nearest weight is 2.5e-5 away, against scale errors measured at < 5e-7 (the bound allows
n u = 5e-4), so at init the excuse for a flipped weight is never needed in practice.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import near_ties
import numpy as np
import pytest
import sharded_runs
from jax.sharding import AbstractMesh
from xla_flags import device_count_flags

from bitnet_jax import BitNetError, BitNetLM, cli, init_params
from bitnet_jax.train import sharding
from bitnet_jax.train.corpus import prepare_corpus
from bitnet_jax.train.run_config import load_run_config
from bitnet_jax.train.run_folder import load_run

CASE_IDS = [sharded_runs.case_name(*case) for case in sharded_runs.CASES]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_corpus, request):
    """Starts the 8-device runs, computes the one-device references meanwhile, and returns both."""
    root = tmp_path_factory.mktemp("sharding")
    corpus, cache = tiny_corpus["corpus"], tiny_corpus["cache"]
    previous_cache = os.environ.get("BITNET_JAX_CACHE")
    os.environ["BITNET_JAX_CACHE"] = cache
    # Both sides must use one tokenizer: train it (and tokenize) once, before either side starts.
    (root / "scratch").mkdir()
    prepare_corpus(
        load_run_config(None, sharded_runs.CLI_SETTINGS + [f"corpus={corpus}"]), str(root / "scratch"), cache
    )

    out = root / "sharded"
    out.mkdir()
    # The suite's flags (tests/xla_flags.py: less LLVM optimization) with 8 simulated devices.
    env = {
        **os.environ,
        "XLA_FLAGS": device_count_flags(8),
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    worker = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("sharded_runs.py")), str(out), corpus],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        reference = {wq: sharded_runs.train_steps(wq) for wq in sorted({wq for _, wq, _ in sharded_runs.CASES})}
        whole = request.getfixturevalue("one_device_cli_run")  # trained here unless test_multiprocess.py did
        output, _ = worker.communicate(timeout=900)
    finally:
        worker.kill()
        if previous_cache is None:
            os.environ.pop("BITNET_JAX_CACHE", None)
        else:
            os.environ["BITNET_JAX_CACHE"] = previous_cache
    assert worker.returncode == 0, output[-5000:]
    return {
        "reference": reference,
        "whole": whole,
        "out": out,
        "arrays": dict(np.load(out / "results.npz")),
        "results": json.loads((out / "results.json").read_text()),
    }


def case_results(runs, name):
    def under(prefix):
        return {k[len(prefix) :]: v for k, v in runs["arrays"].items() if k.startswith(prefix)}

    return (
        runs["results"]["cases"][name],
        under(f"{name}/params/"),
        runs["arrays"][f"{name}/logits"],
        under(f"{name}/sown/"),
    )


@pytest.mark.parametrize("case", sharded_runs.CASES, ids=CASE_IDS)
def test_sharded_training_equals_one_device(runs, case):
    mesh, weight_quant, accum = case
    result, params, logits, sown = case_results(runs, sharded_runs.case_name(*case))
    ref_losses, ref_params, ref_logits, ref_sown = runs["reference"][weight_quant]

    near_ties.assert_same_forward(ref_logits, ref_sown, logits, sown)
    np.testing.assert_allclose(np.array(result["losses"]), ref_losses, rtol=2e-3)
    run = sharded_runs.step_run(weight_quant)
    sharded_runs.assert_same_training(init_params(run.model, run.seed), ref_params, params)
    # The kernels really were split by the rules: up_proj [L, D, F] is P(layers, embed, mlp) =
    # P(None, fsdp, tensor).
    data, fsdp, tensor = mesh
    assert result["up_proj_shard_shape"] == [2, 64 // fsdp, 128 // tensor]


def test_resume_on_another_mesh_equals_uninterrupted_one_device_run(runs):
    """Trained 3 steps on (8, 1, 1), interrupted, resumed on (2, 2, 2) with the layers unrolled
    (`scan_layers=False`): as one run on one device with the layers scanned."""
    results = runs["results"]
    assert "Resumed from step 3" in results["resume_printed"]
    whole = [json.loads(line) for line in (runs["whole"] / "metrics.jsonl").read_text().splitlines()]
    resumed = results["resumed_metrics"]
    assert [m["step"] for m in resumed] == [m["step"] for m in whole] == list(range(7))
    for key in ("loss", "eval_loss"):
        got = [m[key] for m in resumed if key in m]
        want = [m[key] for m in whole if key in m]
        assert len(got) == len(want) > 0
        np.testing.assert_allclose(got, want, rtol=2e-3, err_msg=key)

    run, params_whole, _ = load_run(str(runs["whole"]))
    params = {k[len("resumed/params/") :]: v for k, v in runs["arrays"].items() if k.startswith("resumed/params/")}
    sharded_runs.assert_same_training(init_params(run.model, run.seed), params_whole, params)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("mesh-product", ["mesh=(2, 2, 1)", "needs 4 devices; found 8", "multiply to 8"]),
        ("mesh-wildcard", ["mesh=(3, -1, 1)", "cannot use all 8 devices", "multiply to 8"]),
        ("batch", ["batch_size=12", "data x fsdp = 8 devices", "expected a multiple of 8", "Change batch_size"]),
        (
            "micro-batch",
            ["batch_size=8", "data x fsdp = 4", "grad_accum_steps=4 micro-batches", "expected a multiple of 16"],
        ),
        (
            "param",
            [
                "layers/mlp/down_proj/kernel (2, 100, 64) cannot be split 8 ways over mesh axis tensor",
                "not a multiple of 8",
                "Choose a mesh",
            ],
        ),
    ],
)
def test_bad_mesh_on_8_devices(runs, name, expected):
    result = runs["results"]["errors"][name]
    assert result["status"] == 2 and result["err"].startswith("error: ")
    for part in expected:
        assert part in result["err"], result["err"]
    assert not result["wrote"]  # refused before the run folder was made


# One device (this process).
def test_mesh_must_use_every_device(tmp_path, capsys):
    assert jax.device_count() == 1
    out = tmp_path / "run"
    assert cli.main(["train", "--out", str(out), "--set", "mesh=(2,2,2)"]) == 2
    err = capsys.readouterr().err
    assert "mesh=(2, 2, 2) (data, fsdp, tensor) needs 8 devices; found 1" in err and "--set mesh=(1,1,1)" in err
    assert not out.exists()


@pytest.mark.parametrize("value", ["(0,1,1)", "(2,2)", "(-1,-1,1)", "(1.5,1,1)", "'data'", "(-2,1,1)"])
def test_bad_mesh_values(value):
    with pytest.raises(BitNetError, match=r"RunConfig.mesh=.* is invalid: expected three positive integers"):
        load_run_config(None, [f"mesh={value}"])


def test_mesh_round_trips_through_run_json():
    run = load_run_config(None, ["mesh=[2,-1,1]"])
    assert run.mesh == (2, -1, 1)
    assert type(run).from_dict(json.loads(json.dumps(run.to_dict())), source="json").mesh == (2, -1, 1)


@pytest.mark.parametrize(
    "shape, devices, want",
    [((-1, 1, 1), 8, (8, 1, 1)), ((2, -1, 2), 8, (2, 2, 2)), ((1, 2, 4), 8, (1, 2, 4)), ((-1, 1, 1), 1, (1, 1, 1))],
)
def test_wildcard_takes_the_remaining_devices(shape, devices, want):
    assert sharding.resolve_mesh_shape(shape, devices) == want


def test_batch_must_split_over_data_and_fsdp():
    mesh = AbstractMesh((2, 2, 2), sharding.MESH_AXES)
    sharding.check_batch(16, 4, mesh)  # 4 micro-batches of 4 rows, one row per device
    with pytest.raises(BitNetError, match="batch_size=6 cannot be split evenly over data x fsdp = 4 devices"):
        sharding.check_batch(6, 1, mesh)
    with pytest.raises(BitNetError, match="grad_accum_steps=8 micro-batches: expected a multiple of 32"):
        sharding.check_batch(16, 8, mesh)


def test_parameters_carry_logical_axes_and_init_params_stays_plain():
    config = sharded_runs.step_run("tensor").model.replace(tie_word_embeddings=False)
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
    flat_specs = jax.tree_util.tree_flatten_with_path(sharding.param_specs(BitNetLM(config)), is_leaf=is_spec)[0]
    specs = {"/".join(p.key for p in path): tuple(spec) for path, spec in flat_specs}
    kernels = {
        "embed_tokens/embedding": ("vocab", "embed"),
        "lm_head/kernel": ("embed", "vocab"),
        "layers/self_attn/q_proj/kernel": ("layers", "embed", "q_heads"),
        "layers/self_attn/k_proj/kernel": ("layers", "embed", "kv_heads"),
        "layers/self_attn/v_proj/kernel": ("layers", "embed", "kv_heads"),
        "layers/self_attn/o_proj/kernel": ("layers", "q_heads", "embed"),
        "layers/mlp/gate_proj/kernel": ("layers", "embed", "mlp"),
        "layers/mlp/up_proj/kernel": ("layers", "embed", "mlp"),
        "layers/mlp/down_proj/kernel": ("layers", "mlp", "embed"),
    }
    assert {k: v for k, v in specs.items() if v} == kernels  # norm weights: replicated
    params = init_params(config)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(params))
    assert set(sharded_runs.flat(params)) == set(specs)


def test_constraints_act_only_under_a_mesh():
    """Without a mesh the model is unchanged; the sharded step carries the layer-boundary constraints."""
    run = sharded_runs.step_run("tensor")
    model = BitNetLM(run.model)
    params = init_params(run.model)
    ids = sharded_runs.batches(1)[0]["inputs"]
    plain = jax.jit(model.apply).lower({"params": params}, ids).as_text()
    mesh = sharding.make_mesh((1, 1, 1))

    def forward(params, ids):
        with sharding.activation_sharding(mesh):
            return model.apply({"params": params}, ids)

    constrained = jax.jit(forward).lower(params, ids).as_text()
    assert "sharding_constraint" not in plain
    # embeddings, each layer's output (one in the scanned body), logits
    assert constrained.count("sharding_constraint") >= 3
    assert '[{"data", "fsdp"}, {}, {"tensor"}]' in constrained  # logits [B, T, V]: split over vocab too
