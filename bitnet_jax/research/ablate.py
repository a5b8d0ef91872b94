"""Quantization ablations: `bitnet-jax ablate` trains a grid of quantizer settings against a
full-precision baseline and tabulates the result.

Every run of an ablation is an ordinary run folder under the ablation's folder, trained on one
shared tokenization with the same seed, so the runs differ only in their quantizers:

  <out>/tokenizer.model     the tokenizer all runs use
  <out>/<run name>/         one `bitnet-jax train` run folder per grid point (see train.py)
  <out>/results.md          one row per run: settings, final eval loss, gap to the baseline,
                            tokens/s, parameter bytes when packed
  <out>/results.json        the same, plus each run's eval-loss curve
  <out>/loss_curves.png     eval loss against step, all runs on one plot

Running the same ablation again skips finished runs and resumes unfinished ones.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os

import jax
import numpy as np

from bitnet_jax.errors import BitNetError, did_you_mean
from bitnet_jax.model.config import BitNetConfig
from bitnet_jax.model.transformer import init_params, is_bitlinear_kernel
from bitnet_jax.train.run_config import RunConfig, load_run_config, parse_value

# The fields a grid may vary: the quantizers, so that every grid point has one well-defined
# full-precision baseline (the same model with quantization off). Architecture and training
# fields are set for all runs alike with --set.
GRID_KEYS = ("weight_quant", "act_quant", "act_bits", "linear_norm_eps")
BASELINE = {"weight_quant": "none", "act_quant": "none"}
# Packed layout counted by `packed_param_bytes`: ternary codes at 2 bits (4 per byte), one f32
# scale per granule.
CODE_BITS = 2
SCALE_BYTES = 4


@dataclasses.dataclass(frozen=True)
class AblationRun:
    name: str  # its folder under the ablation folder
    run: RunConfig
    baseline: bool


def parse_grid(items: list[str]) -> dict[str, list]:
    """`["weight_quant=tensor,channel", "act_bits=8,4"]` -> {"weight_quant": [...], "act_bits": [8, 4]}."""
    grid: dict[str, list] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if key.startswith("model."):  # the spelling --set uses
            key = key[len("model.") :]
        if not sep or not key:
            raise BitNetError(
                f"--grid {item!r}: expected key=value1,value2,..., e.g. --grid weight_quant=tensor,channel."
            )
        if key not in GRID_KEYS:
            hint = did_you_mean(key, GRID_KEYS)
            other = (
                " It is a model or training field: set it for all runs with --set." if key in _settable_keys() else ""
            )
            raise BitNetError(
                f"--grid {item!r}: unknown grid key {key!r}{hint}. Expected one of {', '.join(GRID_KEYS)}.{other}"
            )
        if key in grid:
            raise BitNetError(f"--grid {key} is given twice: list all its values in one --grid {key}=a,b,...")
        raws = [r.strip() for r in raw.split(",")]
        if not raw.strip() or any(not r for r in raws):
            raise BitNetError(
                f"--grid {item!r}: empty value in the list; expected comma-separated values such as --grid {key}=a,b."
            )
        values = [parse_value(r) for r in raws]
        if len(set(map(repr, values))) != len(values):
            raise BitNetError(f"--grid {item!r}: a value is repeated; list each value once.")
        grid[key] = values
    if not grid:
        raise BitNetError("No --grid given: expected at least one, e.g. --grid weight_quant=tensor,channel,group:64.")
    return grid


def load_ablation(
    config_path: str | None, overrides: list[str], grid_items: list[str], steps: int | None = None
) -> tuple[RunConfig, dict[str, list]]:
    """The base run config (file, then --set, then --steps) and the parsed grid, all validated."""
    grid = parse_grid(grid_items)
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise BitNetError(f"--steps {steps}: expected a positive number of training steps per run.")
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key.removeprefix("model.") in grid:
            raise BitNetError(
                f"--set {item!r} conflicts with --grid {key.removeprefix('model.')}: the grid sets "
                "that field for every run; drop one of them."
            )
    return load_run_config(config_path, [*overrides, *([f"steps={steps}"] if steps is not None else [])]), grid


def plan_runs(base: RunConfig, grid: dict[str, list]) -> list[AblationRun]:
    """The baseline followed by every grid point, each validated by BitNetConfig (before any
    training starts). Grid points that compute the same model (the baseline itself, or several
    act_bits with act_quant=none) are run once."""
    baseline = AblationRun(run_name(base.model.replace(**BASELINE)), _with_model(base, **BASELINE), True)
    runs, seen = [baseline], {baseline.name}
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        point = dict(zip(keys, values))
        try:
            model = base.model.replace(**point)
        except BitNetError as e:
            setting = ", ".join(f"{k}={v}" for k, v in point.items())
            raise BitNetError(f"--grid point ({setting}): {e}") from None
        if model.act_quant == "none":  # act_bits is unused: one run stands for all of them
            model = model.replace(act_bits=base.model.act_bits)
        name = run_name(model)
        if name not in seen:
            seen.add(name)
            runs.append(AblationRun(name, dataclasses.replace(base, model=model), False))
    return runs


def run_name(model: BitNetConfig) -> str:
    """A folder name from the quantizer settings alone, so that a larger grid reuses the runs
    of a smaller one: `w-group64_a-token-8`, `w-none_a-none`."""
    acts = "none" if model.act_quant == "none" else f"{model.act_quant}-{model.act_bits}"
    name = f"w-{model.weight_quant.replace(':', '')}_a-{acts}"
    if model.linear_norm_eps is not None:
        name += f"_ln-{model.linear_norm_eps:g}"
    return name


def ablate(
    base: RunConfig, grid: dict[str, list], out_dir: str, *, cache_dir: str | None = None, progress: bool = True
) -> list[dict]:
    """Trains the baseline and every grid point (skipping finished runs), writes results.md,
    results.json and loss_curves.png in `out_dir`, and returns the rows of results.json."""
    from bitnet_jax.train import loop as training  # imports orbax; keep `ablate --help` and errors fast

    runs = plan_runs(base, grid)
    for item in runs:  # refuse folders of another ablation before any training starts
        _check_existing(item, os.path.join(out_dir, item.name))
    cache_dir = cache_dir or training.default_cache_dir()
    os.makedirs(out_dir, exist_ok=True)
    # One tokenizer and one token stream for all runs: they share the data, not just the recipe.
    corpus = training.prepare_corpus(base, out_dir, cache_dir)
    for i, item in enumerate(runs, 1):
        run_dir = os.path.join(out_dir, item.name)
        if _finished(item.run, run_dir):
            print(f"[{i}/{len(runs)}] {item.name}: finished earlier, skipped")
            continue
        print(f"[{i}/{len(runs)}] {item.name}: training {item.run.steps} steps")
        training.train(item.run, run_dir, cache_dir=cache_dir, progress=progress, corpus=corpus)
    rows = [_result_row(item, os.path.join(out_dir, item.name)) for item in runs]
    fp_loss = rows[0]["final_eval_loss"]
    for row in rows:
        row["gap_to_baseline"] = row["final_eval_loss"] - fp_loss
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(results_table(base, rows) + "\n")
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"run_config": base.to_dict(), "grid": grid, "runs": rows}, f, indent=2)
    plot_curves(rows, os.path.join(out_dir, "loss_curves.png"))
    return rows


def _check_existing(item: AblationRun, run_dir: str):
    from bitnet_jax.train.loop import RUN_FILE, read_run_file

    if not os.path.isfile(os.path.join(run_dir, RUN_FILE)):
        return
    previous = read_run_file(run_dir).to_dict()
    wanted = item.run.to_dict()
    changed = sorted(k for k in wanted if k != "model" and previous.get(k) != wanted[k])
    changed += sorted(f"model.{k}" for k, v in wanted["model"].items() if previous["model"].get(k) != v)
    if changed:
        raise BitNetError(
            f"{run_dir} holds a run with other settings ({', '.join(changed)} differ): an ablation resumes "
            "only with the same config, --set and --steps. Use another --out folder for a new ablation."
        )


def _finished(run: RunConfig, run_dir: str) -> bool:
    """Trained to its last step, evaluated there, and checkpointed there."""
    records = _read_metrics(run_dir)
    last_eval = [r for r in records if "eval_loss" in r]
    return (
        bool(last_eval)
        and last_eval[-1]["step"] == run.steps
        and os.path.isdir(os.path.join(run_dir, "checkpoints", str(run.steps)))
    )


def _read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _result_row(item: AblationRun, run_dir: str) -> dict:
    records = _read_metrics(run_dir)
    curve = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    # The first logged window of a run includes compilation; the median of the others is the
    # steady rate (a resumed run's extra compile window is an outlier the median ignores).
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]
    m = item.run.model
    return {
        "name": item.name,
        "baseline": item.baseline,
        "weight_quant": m.weight_quant,
        "act_quant": m.act_quant,
        "act_bits": m.act_bits,
        "linear_norm_eps": m.linear_norm_eps,
        "final_eval_loss": curve[-1][1],
        "tokens_per_s": float(np.median(rates)) if rates else math.nan,
        "packed_bytes": packed_param_bytes(m),
        "eval_curve": curve,
    }


def packed_param_bytes(model: BitNetConfig) -> int:
    """Bytes of the parameters stored for serving: each BitLinear kernel as ternary codes at
    `CODE_BITS` bits plus one f32 scale per granule of `weight_quant` (tensor: 1, channel: one per
    output, group:G: one per output and G inputs); embeddings, norms and lm_head stay in their
    float dtype. With weight_quant='none' every parameter counts at its float size."""
    shapes = jax.eval_shape(lambda: init_params(model))
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        if not is_bitlinear_kernel(path) or model.weight_quant == "none":
            total += leaf.size * leaf.dtype.itemsize
            continue
        layers, k, n = leaf.shape  # the scanned kernels are [L, in, out]
        codes = layers * math.ceil(k * n * CODE_BITS / 8)
        if model.weight_quant == "tensor":
            scales = layers
        elif model.weight_quant == "channel":
            scales = layers * n
        else:
            scales = layers * (k // model.weight_group_size) * n
        total += codes + scales * SCALE_BYTES
    return total


def results_table(base: RunConfig, rows: list[dict]) -> str:
    """results.md: a header line that says the scale, then one markdown row per run."""
    from bitnet_jax.bench.train import cpu_name

    m = base.model
    tokens = base.steps * base.batch_size * base.seq_len
    fp_bytes = rows[0]["packed_bytes"]
    lines = [
        f"{m.num_hidden_layers} layers x {m.hidden_size} wide, vocab {m.vocab_size} "
        f"({m.num_params / 1e6:.1f}M parameters); {base.steps} steps of {base.batch_size} x {base.seq_len} tokens "
        f"({tokens / 1e6:.2f}M tokens) per run, seed {base.seed}, eval loss on {base.eval_batches} held-out batches; "
        f"{cpu_name()} ({jax.default_backend()}, {os.cpu_count()} cores), runs one after another.",
        "",
        "| run | weights | activations | final eval loss | gap to FP | tokens/s | packed params (MB) | vs FP |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        acts = "none" if row["act_quant"] == "none" else f"{row['act_quant']}, {row['act_bits']}-bit"
        if row["linear_norm_eps"] is not None:
            acts += f", input norm eps {row['linear_norm_eps']:g}"
        label = "full precision (baseline)" if row["baseline"] else row["name"]
        gap = "-" if row["baseline"] else f"{row['gap_to_baseline']:+.3f}"
        lines.append(
            f"| {label} | {row['weight_quant']} | {acts} | {row['final_eval_loss']:.3f} | {gap} | "
            f"{row['tokens_per_s']:,.0f} | {row['packed_bytes'] / 1e6:.2f} | "
            f"{row['packed_bytes'] / fp_bytes:.2f}x |"
        )
    lines += [
        "",
        f"Packed params: ternary codes at {CODE_BITS} bits per weight plus f32 scales per granule; "
        "embeddings, norms and (untied) lm_head in f32. Gap to FP: final eval loss minus the baseline's "
        "(nats/token, lower is better).",
    ]
    return "\n".join(lines)


def plot_curves(rows: list[dict], path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    # tab10's colours are the most distinct; tab20 (pairs of light and dark) only when needed.
    colors = plt.get_cmap("tab10" if len(rows) <= 11 else "tab20")
    for i, row in enumerate(rows):
        steps, losses = zip(*row["eval_curve"])
        style = (
            dict(color="black", linestyle="--", linewidth=2)
            if row["baseline"]
            else dict(color=colors((i - 1) % colors.N))
        )
        ax.plot(steps, losses, marker=".", label="full precision" if row["baseline"] else row["name"], **style)
    # Step 0 (ln V for every run) would squash the differences that matter; start the y axis
    # near the later evaluations.
    later = [loss for row in rows for step, loss in row["eval_curve"] if step > 0]
    if later:
        low, high = min(later), np.percentile(later, 90)
        ax.set_ylim(low - 0.05 * (high - low), high)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out cross-entropy (nats/token)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _with_model(base: RunConfig, **changes) -> RunConfig:
    return dataclasses.replace(base, model=base.model.replace(**changes))


def _settable_keys() -> set[str]:
    return {f.name for f in dataclasses.fields(RunConfig)} | {f.name for f in dataclasses.fields(BitNetConfig)}
