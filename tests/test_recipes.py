"""Quantizer recipes of the run config: warm start (`quant_start`: full precision, then ternary QAT)
and knowledge distillation (`teacher`, `kd_temperature`, `kd_weight`), each against a reference
written here: separate full-precision and QAT runs, a numpy loss, an undistilled run."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from tiny_run import RUN

from bitnet_jax import BitNetConfig, BitNetError, cli
from bitnet_jax.model.transformer import BitNetLM, init_params
from bitnet_jax.train.loop import train
from bitnet_jax.train.run_config import load_run_config
from bitnet_jax.train.run_folder import load_run
from bitnet_jax.train.step import Distillation, training_loss

# A checkpoint after every step, so that a run can be cut anywhere and its state at the switch
# copied; RUN's 6 steps with quant_start=0.5 switch after step 3.
EVERY_STEP = ["checkpoint_every=1", "keep_checkpoints=6"]
FULL_PRECISION = ["model.weight_quant=none", "model.act_quant=none"]


@pytest.fixture(scope="module")
def env(tiny_env):
    return tiny_env


def train_args(env, out, *extra):
    sets = [f"corpus={env['corpus']}", *RUN, *extra]
    return ["train", "--no-progress", "--out", str(out), *[a for s in sets for a in ("--set", s)]]


def read_metrics(run_dir):
    return {m["step"]: m for m in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())}


def same_params(a, b):
    _, pa, _ = load_run(str(a))
    _, pb, _ = load_run(str(b))
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)))


@pytest.fixture(scope="module")
def full_precision_run(env):
    """The reference of the first phase: the same run with the quantizers off from step 1."""
    out = env["root"] / "fp"
    assert cli.main(train_args(env, out, *FULL_PRECISION, *EVERY_STEP)) == 0
    return out


def test_warm_start_is_full_precision_then_qat_and_resumes_across_the_switch(env, full_precision_run, capsys):
    warm = env["root"] / "warm"
    assert cli.main(train_args(env, warm, "quant_start=0.5", *EVERY_STEP)) == 0
    w, fp = read_metrics(warm), read_metrics(full_precision_run)

    # Steps 1-3 (and the evaluations at 0 and 3) are the full-precision run's: the same program on
    # the same parameters, batches and schedule, deterministic on CPU, so equal to the bit.
    for step in (0, 1, 2, 3):
        assert w[step].get("loss") == fp[step].get("loss") and w[step].get("eval_loss") == fp[step].get("eval_loss")
    assert w[4]["loss"] != fp[4]["loss"]  # the quantizers are on from step 4

    # Steps 4-6 are a ternary QAT run resumed from the full-precision run's state after step 3
    # (its parameters, optimizer and data-iterator state): again the same programs and inputs.
    qat = env["root"] / "qat_from_fp3"
    (qat / "checkpoints").mkdir(parents=True)
    shutil.copytree(full_precision_run / "checkpoints" / "3", qat / "checkpoints" / "3")
    assert cli.main(train_args(env, qat, *EVERY_STEP)) == 0
    q = read_metrics(qat)
    assert sorted(q) == [4, 5, 6]
    for step in (4, 5, 6):
        assert w[step]["loss"] == q[step]["loss"]
    assert w[6]["eval_loss"] == q[6]["eval_loss"]
    assert same_params(warm, qat)

    # Cut after step 2 (before the switch) and resumed: ends bit for bit where the whole run ends.
    resumed = env["root"] / "warm_resumed"
    shutil.copytree(warm, resumed)
    for step in (3, 4, 5, 6):
        shutil.rmtree(resumed / "checkpoints" / str(step))
    capsys.readouterr()
    assert cli.main(train_args(env, resumed, "quant_start=0.5", *EVERY_STEP)) == 0
    assert "Resumed from step 2" in capsys.readouterr().out
    assert same_params(warm, resumed)
    values = lambda metrics: {s: (m.get("loss"), m.get("eval_loss")) for s, m in metrics.items()}  # not timings
    assert values(read_metrics(resumed)) == values(w)


@pytest.mark.parametrize("value", ["1.0", "-0.1", "1.5", "True"])
def test_quant_start_outside_zero_one_is_refused(env, tmp_path, capsys, value):
    assert cli.main(train_args(env, tmp_path / "run", f"quant_start={value}")) == 2
    err = capsys.readouterr().err
    assert f"RunConfig.quant_start={value} is invalid: expected a fraction of the steps in [0, 1)" in err
    assert not (tmp_path / "run").exists()


def _log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


# A mixed objective at T > 1 and pure distillation (each case compiles the two models again: two suffice).
@pytest.mark.parametrize("temperature, weight", [(2.0, 0.25), (4.0, 1.0)])
def test_distillation_loss_against_numpy(temperature, weight):
    # A student and a smaller teacher of another architecture and quantization, one vocabulary.
    student = BitNetConfig.preset(
        "tiny",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
    )
    teacher = student.replace(num_hidden_layers=1, intermediate_size=64, weight_quant="channel")
    params, teacher_params = init_params(student, seed=0), init_params(teacher, seed=1)
    rng = np.random.default_rng(0)
    batch = {
        "inputs": rng.integers(0, 97, (2, 12)).astype(np.int32),
        "targets": rng.integers(0, 97, (2, 12)).astype(np.int32),
        "segment_ids": np.ones((2, 12), np.int32),
    }
    distill = Distillation(BitNetLM(teacher), temperature, weight)
    objective, ce = training_loss(params, BitNetLM(student), batch, distill=distill, teacher_params=teacher_params)

    # The reference, in float64 from the two models' logits.
    s = np.asarray(BitNetLM(student).apply({"params": params}, batch["inputs"]), np.float64)
    t = np.asarray(BitNetLM(teacher).apply({"params": teacher_params}, batch["inputs"]), np.float64)
    ce_ref = -np.take_along_axis(_log_softmax(s), batch["targets"][..., None], -1).mean()
    p_t = np.exp(_log_softmax(t / temperature))
    kl_ref = (p_t * (_log_softmax(t / temperature) - _log_softmax(s / temperature))).sum(-1).mean()
    ref = (1 - weight) * ce_ref + weight * temperature**2 * kl_ref
    # f32 log-softmax over 97 logits of magnitude ~5: each term within a few f32 ulps of the
    # float64 value (1e-6 relative), sums of 24 tokens and 97 classes add at most ~100 such errors.
    assert float(ce) == pytest.approx(ce_ref, rel=1e-5)
    assert float(objective) == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert kl_ref > 1e-3  # the two random models disagree: the check is not 0 == 0


def test_distillation_from_a_teacher_run_end_to_end(env, full_precision_run, capsys):
    plain = env["root"] / "plain"
    assert cli.main(train_args(env, plain)) == 0
    student = env["root"] / "distilled"
    kd = [f"teacher={full_precision_run}", "kd_temperature=2.0", "kd_weight=0.5"]
    capsys.readouterr()
    assert cli.main(train_args(env, student, *kd)) == 0
    assert "Done: step 6" in capsys.readouterr().out
    run = json.loads((student / "run.json").read_text())
    assert (run["teacher"], run["kd_temperature"], run["kd_weight"]) == (str(full_precision_run), 2.0, 0.5)
    d, p = read_metrics(student), read_metrics(plain)
    # The logged loss is the cross-entropy, before the step's update: the same initial parameters
    # and first batch as the undistilled run give the same value to the bit. The teacher changes
    # the gradients; AdamW's first update is g / (|g| + eps), about sign(g), which the mix can
    # leave as it is, so the runs part from the second update on (step 3's loss).
    assert d[0]["eval_loss"] == p[0]["eval_loss"] and d[1]["loss"] == p[1]["loss"]
    assert all(d[step]["loss"] != p[step]["loss"] for step in (3, 4, 5, 6))
    assert d[6]["eval_loss"] != p[6]["eval_loss"] and np.isfinite(d[6]["eval_loss"])


def test_teacher_with_another_vocabulary_is_refused(env, tmp_path):
    run = load_run_config(None, [f"corpus={env['corpus']}", *RUN, "teacher=some/teacher"])
    other = run.model.replace(vocab_size=320)
    with pytest.raises(BitNetError, match="its vocabulary has 320 tokens and the student's 640"):
        train(run, str(tmp_path / "run"), teacher=(other, None), progress=False)
    assert not (tmp_path / "run").exists()
    # A run that names a teacher cannot train without it.
    with pytest.raises(BitNetError, match="This run distills from some/teacher: pass its model"):
        train(run, str(tmp_path / "run"), progress=False)


@pytest.mark.parametrize(
    "setting, message",
    [
        ("kd_temperature=0", "RunConfig.kd_temperature=0 is invalid: expected a positive number"),
        ("kd_weight=1.5", "RunConfig.kd_weight=1.5 is invalid: expected a number in [0, 1]"),
    ],
)
def test_bad_distillation_settings_are_refused(env, tmp_path, capsys, setting, message):
    assert cli.main(train_args(env, tmp_path / "run", setting)) == 2
    assert message in capsys.readouterr().err
