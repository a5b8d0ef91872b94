"""`bitnet-jax ablate` end to end at a tiny scale (the table against the run folders' own metrics,
skipping and resuming), the packed-size count against a hand count, and the input errors."""

import json
import os
import shutil

import pytest
from tiny_run import CORPUS_FILES, RUN

from bitnet_jax import BitNetConfig, cli
from bitnet_jax.data.pipeline import stdlib_root
from bitnet_jax.model.transformer import init_params
from bitnet_jax.research.ablate import parse_grid, plan_runs, stored_param_bytes
from bitnet_jax.train.run_config import load_run_config

# The shared tiny run as it is, 6 steps evaluated and saved every 3: an eval curve of three points,
# a run that can be resumed halfway, and its w-tensor_a-token-8 run the very programs that
# test_train.py runs (compiled once in the suite).
TINY = RUN

# Bytes of TINY as `convert` writes it, counted by hand from kernels/layout.py's formats. Per layer,
# BitLinear kernels [in K, out N]: q and o 64x64, k and v 64x32 (2 KV heads of 16), gate, up 64x128
# and down 128x64: 36864 weights, 73728 in the 2 layers. Packed, a kernel is uint8
# [ceil(N / 4), ceil(K / 256) * 256]: K pads to one block of 256, so q, o, down take 16 x 256,
# k, v 8 x 256, gate, up 32 x 256: 32768 bytes per layer, 65536 in all (padding included).
# Floats: per layer 3 norms of 64 and the FFN sub-norm of 128 (640 in all), the final norm 64;
# the tied embedding 640x64 = 40960.
TINY_PACKED_BYTES = {
    # not packable: the f32 training parameters, 73728 + 640 + 64 + 40960 floats
    "none": 4 * (73728 + 41664),  # 461568
    # one f32 scale per kernel (7 per layer); norms in f32; the tied embedding as the default
    # 'int8-tied' table: int8 [640, 64] (64 is already a multiple of 64) plus one f32 scale per row
    "tensor": 65536 + 4 * 14 + 4 * 704 + 640 * 64 + 4 * 640,  # 111928
    # per layer (64/32)x64 + 2 x (64/32)x32 + (64/32)x64 + 2 x (64/32)x128 + (128/32)x64 = 1152 scales;
    # the codes as TQ2G tiles, N / 16 tiles of K * 4 bytes: 2 x (64 x 64 x 4 + 2 x 32 x 64 x 4 + 2 x 128 x 64 x 4
    # + 64 x 128 x 4) / 16 = 18432
    "group:32": 18432 + 4 * 2304 + 4 * 704 + 640 * 64 + 4 * 640,  # 73984
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


def ablate_args(env, out, *grid, steps="6", extra=()):
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
    shutil.rmtree(out / "w-tensor_a-token-8" / "checkpoints" / "6")
    assert cli.main(ablate_args(env, out, "weight_quant=tensor,group:32", "act_bits=8")) == 0
    printed = capsys.readouterr().out
    assert "w-none_a-none: finished earlier, skipped" in printed
    assert "w-tensor_a-token-8: training 6 steps" in printed and "Resumed from step 3" in printed
    assert "w-group32_a-token-8: training 6 steps" in printed and printed.count("Resumed") == 1
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
        assert metrics[-1]["step"] == 6 and row["final_eval_loss"] == metrics[-1]["eval_loss"]
        assert row["gap_to_baseline"] == pytest.approx(metrics[-1]["eval_loss"] - fp_loss)
        assert [s for s, _ in row["eval_curve"]] == [0, 3, 6]
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
    assert "6 steps of 4 x 32 tokens" in table
    # bytes | stored as | vs FP: 111928 / 461568 = 0.24, 121088 / 461568 = 0.26
    assert table.count("| 461,568 | float32 (not packable) | 1.00x |") == 1
    assert "| 111,928 | packed, lm_head int8-tied | 0.24x |" in table
    assert "| 73,984 | packed, lm_head int8-tied | 0.16x |" in table


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
    # Per layer, BitLinear kernels [in K, out N]: q 64x64, k 64x32, v 64x32, o 64x64, gate/up 64x96,
    # down 96x64. Packed uint8 [ceil(N / 4), ceil(K / 256) * 256] (TQ2B): every K here pads to one
    # block of 256, so a kernel takes N / 4 * 256 = 64 N bytes. With group scales, TQ2G tiles
    # [ceil(N / 16), ceil(K / 64) * 256]: K = 64 is one strip, 96 pads to two; every N is whole tiles,
    # so a kernel takes N / 16 * 256 = 16 N bytes per 64 inputs.
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
    codes = 64 * (64 + 32 + 32 + 64 + 96 + 96 + 64)  # 28672 per layer, padding included
    tiles = 16 * (64 + 32 + 32 + 64 + 96 + 96) + 2 * 16 * 64  # 8192 per layer: down_proj's K = 96 pads to 128
    norms = 2 * (64 + 64 + 64 + 96) + 64  # per layer, final norm
    floats = norms + 97 * 64  # and the tied embedding

    def count(c):
        return stored_param_bytes(c, init_params(c))

    assert count(config.replace(weight_quant="none")) == (4 * (2 * weights + floats), "float32 (not packable)")
    # Tied: the default 'int8-tied' table, int8 [97, 64] (64 is a multiple of the 64-byte row
    # alignment) plus an f32 scale per row, serves both ends.
    int8_table = 97 * 64 + 4 * 97
    scales = {
        "tensor": 7,
        "channel": 64 + 32 + 32 + 64 + 96 + 96 + 64,
        "group:32": 2 * 64 + 2 * 32 + 2 * 32 + 2 * 64 + 2 * 96 + 2 * 96 + 3 * 64,
    }
    for mode, per_layer in scales.items():
        packed_codes = tiles if mode.startswith("group") else codes
        assert count(config.replace(weight_quant=mode)) == (
            2 * packed_codes + 4 * (2 * per_layer + norms) + int8_table,
            "packed, lm_head int8-tied",
        )
    # Untied: the f32 embedding [97, 64] stays, the lm_head becomes the int8 table ('int8').
    untied = count(config.replace(weight_quant="tensor", tie_word_embeddings=False))
    assert untied == (2 * codes + 4 * (14 + norms) + 4 * 97 * 64 + int8_table, "packed, lm_head int8")
    # act_quant='tensor' has no packed kernel: its float bytes.
    assert count(config.replace(act_quant="tensor")) == (4 * (2 * weights + floats), "float32 (not packable)")


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
