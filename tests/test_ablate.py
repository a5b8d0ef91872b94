"""`bitnet-jax ablate` end to end at a tiny scale (the table against the run folders' own metrics,
skipping and resuming), the packed-size count against a hand count, and the input errors."""

import json
import os
import shutil

import pytest

from bitnet_jax import BitNetConfig, cli
from bitnet_jax.data.pipeline import stdlib_root
from bitnet_jax.research.ablate import packed_param_bytes, parse_grid, plan_runs
from bitnet_jax.train.run_config import load_run_config

CORPUS_FILES = [
    "textwrap.py",
    "shlex.py",
    "fnmatch.py",
    "glob.py",
    "bisect.py",
    "heapq.py",
    "colorsys.py",
    "keyword.py",
    "linecache.py",
    "queue.py",
    "sched.py",
    "this.py",
    "tabnanny.py",
    "calendar.py",
]
TINY = [
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "model.num_hidden_layers=2",
    "model.num_attention_heads=4",
    "model.num_key_value_heads=2",
    "model.vocab_size=640",
    "model.max_position_embeddings=64",
    "seq_len=32",
    "batch_size=4",
    "warmup_steps=1",
    "log_every=1",
    "eval_every=2",
    "eval_batches=2",
    "checkpoint_every=2",
    "heldout_fraction=0.1",
    "learning_rate=1e-2",
]

# Packed parameter bytes of TINY, counted by hand. Per layer, BitLinear kernels [in, out]: q and o
# 64x64, k and v 64x32 (2 KV heads of 16), gate, up 64x128 and down 128x64: 36864 weights, 73728 in
# the 2 layers. Floats: per layer 3 norms of 64 and the FFN sub-norm of 128 (640 in all), the tied
# embedding 640x64 = 40960, the final norm 64: 41664, at 4 bytes each.
TINY_PACKED_BYTES = {
    "none": 4 * (73728 + 41664),  # 461568
    # codes at 2 bits: 73728 / 4 bytes; one f32 scale per kernel: 7 per layer
    "tensor": 18432 + 4 * 14 + 4 * 41664,  # 185144
    # per layer (64/32)x64 + 2 x (64/32)x32 + (64/32)x64 + 2 x (64/32)x128 + (128/32)x64 = 1152 scales
    "group:32": 18432 + 4 * 2304 + 4 * 41664,  # 194304
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablate")
    corpus = root / "corpus"
    corpus.mkdir()
    for name in CORPUS_FILES:
        shutil.copy(stdlib_root() / name, corpus / f"{name}.txt")
    os.environ["BITNET_JAX_CACHE"] = str(root / "cache")
    yield {"root": root, "corpus": str(corpus)}
    os.environ.pop("BITNET_JAX_CACHE", None)


def ablate_args(env, out, *grid, steps="4", extra=()):
    sets = [f"corpus={env['corpus']}", *TINY, *extra]
    return [
        "ablate",
        "--no-progress",
        "--out",
        str(out),
        "--steps",
        steps,
        *[a for g in grid for a in ("--grid", g)],
        *[a for s in sets for a in ("--set", s)],
    ]


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ablate_tables_every_run_then_skips_and_resumes(env, capsys):
    out = env["root"] / "abl"
    assert cli.main(ablate_args(env, out, "weight_quant=tensor", "act_bits=8")) == 0
    capsys.readouterr()
    assert {"w-none_a-none", "w-tensor_a-token-8", "results.md"} <= set(os.listdir(out))
    first = json.loads((out / "results.json").read_text())["runs"]

    # Again with a larger grid and one run's last checkpoint lost: the finished baseline is
    # skipped, the damaged run resumes, only the new grid point trains from scratch.
    baseline_metrics = (out / "w-none_a-none" / "metrics.jsonl").read_text()
    shutil.rmtree(out / "w-tensor_a-token-8" / "checkpoints" / "4")
    assert cli.main(ablate_args(env, out, "weight_quant=tensor,group:32", "act_bits=8")) == 0
    printed = capsys.readouterr().out
    assert "w-none_a-none: finished earlier, skipped" in printed
    assert "w-tensor_a-token-8: training 4 steps" in printed and "Resumed from step 2" in printed
    assert "w-group32_a-token-8: training 4 steps" in printed and printed.count("Resumed") == 1
    assert (out / "w-none_a-none" / "metrics.jsonl").read_text() == baseline_metrics

    names = ["w-none_a-none", "w-tensor_a-token-8", "w-group32_a-token-8"]
    assert {*names, "results.md", "results.json", "loss_curves.png", "tokenizer.model"} <= set(os.listdir(out))
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads((out / "results.json").read_text())["runs"]
    assert [r["name"] for r in rows] == names and rows[0]["baseline"]
    assert rows[1]["final_eval_loss"] == pytest.approx(first[1]["final_eval_loss"], rel=1e-6)  # exact resume
    fp_loss = read_metrics(out / names[0])[-1]["eval_loss"]
    for row in rows:
        run_dir = out / row["name"]
        # Every run is a normal run folder on the shared tokenizer, with its own settings.
        assert (run_dir / "tokenizer.model").read_bytes() == (out / "tokenizer.model").read_bytes()
        model = json.loads((run_dir / "run.json").read_text())["model"]
        assert (model["weight_quant"], model["act_quant"]) == (row["weight_quant"], row["act_quant"])
        metrics = read_metrics(run_dir)
        assert metrics[-1]["step"] == 4 and row["final_eval_loss"] == metrics[-1]["eval_loss"]
        assert row["gap_to_baseline"] == pytest.approx(metrics[-1]["eval_loss"] - fp_loss)
        assert [s for s, _ in row["eval_curve"]] == [0, 2, 4]
        assert row["tokens_per_s"] > 0
        assert row["packed_bytes"] == TINY_PACKED_BYTES[row["weight_quant"]]
    assert rows[1]["final_eval_loss"] != rows[2]["final_eval_loss"]
    table = (out / "results.md").read_text()
    assert table in printed
    assert "| full precision (baseline) | none | none |" in table
    assert (
        f"| w-group32_a-token-8 | group:32 | token, 8-bit | {rows[2]['final_eval_loss']:.3f} | "
        f"{rows[2]['gap_to_baseline']:+.3f} |" in table
    )
    assert "4 steps of 4 x 32 tokens" in table
    assert table.count("| 0.46 | 1.00x |") == 1 and "| 0.19 | 0.40x |" in table and "| 0.19 | 0.42x |" in table


def test_ablate_refuses_a_folder_with_other_settings(env, tmp_path, capsys):
    out = tmp_path / "abl"
    (out / "w-none_a-none").mkdir(parents=True)
    run = load_run_config(
        None, [f"corpus={env['corpus']}", *TINY, "steps=9", "model.weight_quant=none", "model.act_quant=none"]
    )
    (out / "w-none_a-none" / "run.json").write_text(json.dumps(run.to_dict()))
    assert cli.main(ablate_args(env, out, "weight_quant=tensor")) == 2
    err = capsys.readouterr().err
    assert "holds a run with other settings (steps differ)" in err
    assert sorted(os.listdir(out)) == ["w-none_a-none"]  # nothing trained


def test_packed_bytes_against_a_hand_count():
    # Per layer, BitLinear kernels [in, out]: q 64x64, k 64x32, v 64x32, o 64x64, gate/up 64x96, down 96x64.
    config = BitNetConfig.preset(
        "tiny",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
    )
    weights = 64 * 64 * 2 + 64 * 32 * 2 + 64 * 96 * 2 + 96 * 64  # 30720 per layer
    floats = 2 * (64 + 64 + 64 + 96) + 97 * 64 + 64  # norms per layer, tied embedding, final norm
    assert packed_param_bytes(config.replace(weight_quant="none")) == 4 * (2 * weights + floats)
    scales = {
        "tensor": 7,
        "channel": 64 + 32 + 32 + 64 + 96 + 96 + 64,
        "group:32": 2 * 64 + 2 * 32 + 2 * 32 + 2 * 64 + 2 * 96 + 2 * 96 + 3 * 64,
    }
    for mode, per_layer in scales.items():
        assert packed_param_bytes(config.replace(weight_quant=mode)) == 2 * (weights // 4) + 4 * (
            2 * per_layer + floats
        )
    untied = config.replace(weight_quant="tensor", tie_word_embeddings=False)
    assert packed_param_bytes(untied) == packed_param_bytes(config.replace(weight_quant="tensor")) + 4 * 64 * 97


def test_plan_runs_puts_the_baseline_first_and_runs_each_model_once():
    base = load_run_config(None, [])
    runs = plan_runs(base, parse_grid(["weight_quant=none,tensor", "act_quant=none,token", "act_bits=8,4"]))
    assert [r.name for r in runs] == [
        "w-none_a-none",
        "w-none_a-token-8",
        "w-none_a-token-4",
        "w-tensor_a-none",
        "w-tensor_a-token-8",
        "w-tensor_a-token-4",
    ]
    assert [r.baseline for r in runs] == [True] + [False] * 5
    assert runs[0].run.model == base.model.replace(weight_quant="none", act_quant="none")
    assert runs[5].run.model.act_bits == 4 and runs[5].run.steps == base.steps


@pytest.mark.parametrize(
    "grid, steps, message",
    [
        (["weight_qant=tensor"], "4", "unknown grid key 'weight_qant' (did you mean 'weight_quant'?)"),
        (["hidden_size=64,128"], "4", "It is a model or training field: set it for all runs with --set"),
        (
            ["act_bits=8,9"],
            "4",
            "--grid point (act_bits=9): BitNetConfig.act_bits=9 is invalid: expected an integer from 2 to 8",
        ),
        (
            ["weight_quant=tensor,group:48"],
            "4",
            "BitNetConfig.weight_quant='group:48' is invalid: expected a group size that divides",
        ),
        (["weight_quant=ternary"], "4", "BitNetConfig.weight_quant='ternary' is invalid"),
        (["act_bits="], "4", "--grid 'act_bits=': empty value"),
        (["act_bits=8,,4"], "4", "--grid 'act_bits=8,,4': empty value"),
        (["act_bits"], "4", "expected key=value1,value2"),
        (["act_bits=8,8"], "4", "a value is repeated"),
        (["act_bits=8", "act_bits=4"], "4", "--grid act_bits is given twice"),
        ([], "4", "No --grid given"),
        (["act_bits=8,4"], "0", "--steps 0: expected a positive number of training steps"),
        (["act_bits=8,4"], "-3", "--steps -3: expected a positive number"),
    ],
)
def test_bad_grid_or_steps_is_refused_before_anything_is_written(env, tmp_path, capsys, grid, steps, message):
    assert cli.main(ablate_args(env, tmp_path / "abl", *grid, steps=steps)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "abl").exists()


def test_set_and_grid_on_the_same_field_is_refused(env, tmp_path, capsys):
    argv = ablate_args(env, tmp_path / "abl", "weight_quant=tensor", extra=["model.weight_quant=channel"])
    assert cli.main(argv) == 2
    assert "conflicts with --grid weight_quant" in capsys.readouterr().err
