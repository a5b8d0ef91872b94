"""Quantization ablations: `bitnet-jax ablate` trains a grid of quantizer settings against a
full-precision baseline and tabulates the result.

Every run of an ablation is an ordinary run folder under the ablation's folder, trained on one
shared tokenization with the same seeds, so the variants differ only in their quantizers:

  <out>/tokenizer.model       the tokenizer all runs use
  <out>/<variant>/            one `bitnet-jax train` run folder per grid point (see train.py), for
                              the first seed; `<variant>_seed<S>/` for the other `--seeds`
  <out>/results.md            one row per variant: settings, final eval loss and bits per byte
                              (mean and spread over seeds), gap to the baseline, train tokens/s,
                              bytes as served, decode tokens/s
  <out>/results.json          the same, plus every seed's numbers and the eval-loss curves
  <out>/loss_curves.png       eval loss against step (mean over seeds), all variants on one plot
  <out>/quality_vs_bytes.png  bits per byte against bytes as served, one point per variant

What each variant is measured on, after training:
  final eval loss   the run's last evaluation (metrics.jsonl), nats per token;
  bits per byte     `research.eval` scoring of the trained (fake-quant) parameters on the first
                    `eval_batches * batch_size * seq_len` tokens of the held-out documents, in
                    windows of `seq_len`: total NLL in bits / UTF-8 bytes, tokenizer-independent;
  bytes             the sum of `nbytes` of the arrays `bitnet-jax convert` writes
                    (`serve.pack.pack` with its default lm_head: codes with their padding,
                    scales, norms, the int8 embedding / lm_head); for a variant that cannot be
                    packed (weight_quant='none', act_quant other than 'token'), the float
                    training parameters, and the table says so;
  decode tokens/s   `bitnet_jax.generate` of the packed model (FFI kernels where they take the
                    granularity, else the XLA integer path; unpackable variants: the fake-quant
                    forward in XLA ops), greedy, DECODE_NEW_TOKENS new tokens after a
                    DECODE_PROMPT_TOKENS-token held-out prompt, the median of DECODE_REPEATS
                    timed calls after one that compiles; the first seed's parameters.

Running the same ablation again skips finished runs and resumes unfinished ones (the measurements
above are taken again from the run folders: they are cheap beside training).
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
from bitnet_jax.train.run_config import RunConfig, load_run_config, parse_value

# The fields a grid may vary: the quantizers, so that every grid point has one well-defined
# full-precision baseline (the same model with quantization off). Architecture and training
# fields are set for all runs alike with --set.
GRID_KEYS = ("weight_quant", "act_quant", "act_bits", "linear_norm_eps", "hadamard", "hadamard_seed")
# The baseline is unrotated too: without quantizers a Hadamard rotation changes nothing the model
# can express (model/hadamard.py).
BASELINE = {"weight_quant": "none", "act_quant": "none", "hadamard": 0, "hadamard_seed": None}
# Decode speed: new tokens after a prompt of held-out tokens, median of timed calls.
DECODE_PROMPT_TOKENS = 16
DECODE_NEW_TOKENS = 32
DECODE_REPEATS = 3


@dataclasses.dataclass(frozen=True)
class AblationRun:
    name: str  # its folder under the ablation folder
    run: RunConfig
    baseline: bool
    variant: str = ""  # the grid point (its first seed's folder name); "" for `name`

    def __post_init__(self):
        if not self.variant:
            object.__setattr__(self, "variant", self.name)


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
    config_path: str | None, overrides: list[str], grid_items: list[str], steps: int | None = None, seeds: int = 1
) -> tuple[RunConfig, dict[str, list]]:
    """The base run config (file, then --set, then --steps) and the parsed grid, all validated."""
    grid = parse_grid(grid_items)
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise BitNetError(f"--steps {steps}: expected a positive number of training steps per run.")
    _check_seeds(seeds)
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key.removeprefix("model.") in grid:
            raise BitNetError(
                f"--set {item!r} conflicts with --grid {key.removeprefix('model.')}: the grid sets "
                "that field for every run; drop one of them."
            )
    return load_run_config(config_path, [*overrides, *([f"steps={steps}"] if steps is not None else [])]), grid


def _check_seeds(seeds: int):
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise BitNetError(f"--seeds {seeds}: expected a positive number of seeds per variant (1: the run's seed only).")


def plan_runs(base: RunConfig, grid: dict[str, list], seeds: int = 1) -> list[AblationRun]:
    """The baseline followed by every grid point, each validated by BitNetConfig (before any
    training starts), each with `seeds` seeds (base.seed, base.seed + 1, ...; all of a variant's
    runs follow one another). Grid points that compute the same model (the baseline itself, or
    several act_bits with act_quant=none) are run once."""
    _check_seeds(seeds)
    runs = []
    for item in _plan_variants(base, grid):
        for k in range(seeds):
            seed = base.seed + k
            name = item.name if k == 0 else f"{item.name}_seed{seed}"
            runs.append(AblationRun(name, dataclasses.replace(item.run, seed=seed), item.baseline, item.name))
    return runs


def _plan_variants(base: RunConfig, grid: dict[str, list]) -> list[AblationRun]:
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
        if model.act_quant == model.weight_quant == "none":  # so is hadamard
            model = model.replace(hadamard=0)
        if model.hadamard == 0:  # and then its signs
            model = model.replace(hadamard_seed=None)
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
    if model.hadamard:
        name += "_h-max" if model.hadamard == -1 else f"_h-{model.hadamard}"
        if model.hadamard_seed is not None:
            name += f"-signs{model.hadamard_seed}"
    return name


def ablate(
    base: RunConfig,
    grid: dict[str, list],
    out_dir: str,
    *,
    seeds: int = 1,
    cache_dir: str | None = None,
    progress: bool = True,
) -> list[dict]:
    """Trains the baseline and every grid point, `seeds` seeds each (skipping finished runs),
    measures every variant (module doc), writes results.md, results.json, loss_curves.png and
    quality_vs_bytes.png in `out_dir`, and returns the rows of results.json (one per variant)."""
    # These import orbax: kept lazy so that `ablate --help` and its errors stay fast.
    from bitnet_jax.research.eval import split_documents
    from bitnet_jax.train import loop as training
    from bitnet_jax.train.corpus import prepare_corpus
    from bitnet_jax.train.run_folder import default_cache_dir

    runs = plan_runs(base, grid, seeds)
    for item in runs:  # refuse folders of another ablation before any training starts
        _check_existing(item, os.path.join(out_dir, item.name))
    cache_dir = cache_dir or default_cache_dir()
    os.makedirs(out_dir, exist_ok=True)
    # One tokenizer and one token stream for all runs: they share the data, not just the recipe.
    corpus = prepare_corpus(base, out_dir, cache_dir)
    teacher = None
    for i, item in enumerate(runs, 1):
        run_dir = os.path.join(out_dir, item.name)
        if _finished(item.run, run_dir):
            print(f"[{i}/{len(runs)}] {item.name}: finished earlier, skipped")
            continue
        print(f"[{i}/{len(runs)}] {item.name}: training {item.run.steps} steps")
        if base.teacher and teacher is None:  # --set teacher=...: one teacher distills into every run
            from bitnet_jax.serve.load import load_training_model

            teacher = load_training_model(base.teacher)[:2]
        training.train(item.run, run_dir, cache_dir=cache_dir, progress=progress, corpus=corpus, teacher=teacher)
    docs = split_documents(corpus.eval_tokens, corpus.tokenizer.eos_id)
    if not docs:
        raise BitNetError(
            "The held-out split holds no documents, so the variants cannot be scored: raise heldout_fraction "
            "or give a corpus of several documents."
        )
    variants = {}
    for item in runs:
        variants.setdefault(item.variant, []).append(item)
    rows = []
    for i, items in enumerate(variants.values(), 1):
        print(f"[{i}/{len(variants)}] {items[0].variant}: measuring (bits per byte, bytes, decode speed)")
        rows.append(_result_row(items, out_dir, corpus.tokenizer, docs))
    fp_loss = rows[0]["final_eval_loss"]
    fp_bpb = rows[0]["bits_per_byte"]
    for row in rows:
        row["gap_to_baseline"] = row["final_eval_loss"] - fp_loss
        row["bits_per_byte_gap"] = row["bits_per_byte"] - fp_bpb
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(results_table(base, rows) + "\n")
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"run_config": base.to_dict(), "grid": grid, "seeds": seeds, "runs": rows}, f, indent=2)
    plot_curves(rows, os.path.join(out_dir, "loss_curves.png"))
    plot_quality_vs_bytes(rows, os.path.join(out_dir, "quality_vs_bytes.png"))
    return rows


def _check_existing(item: AblationRun, run_dir: str):
    from bitnet_jax.train.run_folder import RUN_FILE, read_run_file

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


def _result_row(items: list[AblationRun], out_dir: str, tokenizer, docs: list[np.ndarray]) -> dict:
    """One variant's row: its seeds' losses and bits per byte (each, mean, spread), and the bytes
    and decode speed of its first seed's parameters."""
    from bitnet_jax.research.eval import document_ids
    from bitnet_jax.train.run_folder import load_run

    first = items[0]
    run_dirs = [os.path.join(out_dir, item.name) for item in items]
    curves, losses, bpbs, rates = [], [], [], []
    for item, run_dir in zip(items, run_dirs):
        records = _read_metrics(run_dir)
        curves.append([(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r])
        losses.append(curves[-1][-1][1])
        # The first logged window of a run includes compilation; the median of the others is the
        # steady rate (a resumed run's extra compile window is an outlier the median ignores).
        rates += [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]
        run, params, _ = load_run(run_dir)
        bpbs.append(heldout_bits_per_byte(run, params, tokenizer, docs))
        if item is first:
            size, stored_as = stored_param_bytes(run.model, params)
            decode_rate, decode_path = decode_tokens_per_s(
                run.model, params, np.concatenate(list(map(document_ids, docs)))
            )
    # Every seed evaluates at the same steps: the curve is their mean.
    curve = [(step, float(np.mean([c[j][1] for c in curves]))) for j, (step, _) in enumerate(curves[0])]
    m = first.run.model
    return {
        "name": first.variant,
        "baseline": first.baseline,
        "weight_quant": m.weight_quant,
        "act_quant": m.act_quant,
        "act_bits": m.act_bits,
        "linear_norm_eps": m.linear_norm_eps,
        "hadamard": m.hadamard,
        "hadamard_seed": m.hadamard_seed,
        "seeds": [item.run.seed for item in items],
        **seed_statistics(losses, bpbs),
        "tokens_per_s": float(np.median(rates)) if rates else math.nan,
        "packed_bytes": size,
        "stored_as": stored_as,
        "decode_tokens_per_s": decode_rate,
        "decode_path": decode_path,
        "eval_curve": curve,
    }


def seed_statistics(losses: list[float], bits_per_byte: list[float]) -> dict:
    """A variant's final held-out losses and bits per byte over its seeds, with their means and
    sample standard deviations (NaN for one seed: no spread measured), under the keys of
    results.json."""
    spread = lambda values: float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
    return {
        "final_eval_losses": list(losses),
        "final_eval_loss": float(np.mean(losses)),
        "final_eval_loss_std": spread(losses),
        "bits_per_byte_per_seed": list(bits_per_byte),
        "bits_per_byte": float(np.mean(bits_per_byte)),
        "bits_per_byte_std": spread(bits_per_byte),
    }


def heldout_bits_per_byte(run: RunConfig, params, tokenizer, docs: list[np.ndarray]) -> float:
    """Bits per byte of training parameters (the fake-quant forward) on the first
    `eval_batches * batch_size * seq_len` held-out tokens, as `bitnet-jax eval` scores them in
    windows of `seq_len` (the positions the model was trained on)."""
    from bitnet_jax.research.eval import Scorer, evaluate

    scorer = Scorer(run.model, params, context=run.seq_len)
    budget = run.eval_batches * run.batch_size * run.seq_len
    return evaluate(scorer, tokenizer, docs, max_tokens=budget).bits_per_byte


def stored_param_bytes(config: BitNetConfig, params) -> tuple[int, str]:
    """(bytes, how stored) of the parameters `bitnet-jax convert` writes from these training
    parameters: the sum of the `nbytes` of the real arrays of `serve.pack.pack` with its default
    lm_head (2-bit codes with their block padding, scales, norms, the int8 embedding or lm_head).
    A model `pack` refuses (weight_quant='none', act_quant other than 'token') is served from its
    training parameters: their float bytes, 'float32 (not packable)'."""
    from bitnet_jax.kernels.ops import default_lm_head
    from bitnet_jax.serve.pack import pack

    try:
        packed = pack(config, params)
    except BitNetError:  # pack's own rule of what it can pack
        return sum(np.asarray(x).nbytes for x in jax.tree.leaves(params)), "float32 (not packable)"
    return sum(x.nbytes for x in jax.tree.leaves(packed)), f"packed, lm_head {default_lm_head(config)}"


def decode_tokens_per_s(config: BitNetConfig, params, tokens: np.ndarray) -> tuple[float, str]:
    """(new tokens per second, path) of greedy `bitnet_jax.generate` on the packed model:
    DECODE_NEW_TOKENS after the first DECODE_PROMPT_TOKENS of `tokens` (prefill included, small
    beside the decode), the median of DECODE_REPEATS timed calls after a compiling one. The path
    is 'ffi' where the FFI kernels take the granularity, 'xla path' where the packed model runs
    in XLA integer ops (per-group scales, non-CPU devices), 'xla path (unpacked)' where it cannot
    be packed and the fake-quant forward serves it."""
    import time

    from bitnet_jax.serve.generate import generate, serving_params
    from bitnet_jax.serve.pack import pack

    try:
        served = pack(config, params)
    except BitNetError:  # the same rule as stored_param_bytes
        served = params
    spec = serving_params(config, served, None)[1]
    path = "xla path (unpacked)" if spec is None else "ffi" if spec.backend == "ffi" else "xla path"
    prompt = np.asarray(tokens[:DECODE_PROMPT_TOKENS], np.int32)
    generate(config, served, prompt, DECODE_NEW_TOKENS)  # compiles
    seconds = []
    for _ in range(DECODE_REPEATS):
        start = time.perf_counter()
        generate(config, served, prompt, DECODE_NEW_TOKENS)
        seconds.append(time.perf_counter() - start)
    return DECODE_NEW_TOKENS / float(np.median(seconds)), path


def results_table(base: RunConfig, rows: list[dict]) -> str:
    """results.md: a header line that says the scale, then one markdown row per variant."""
    from bitnet_jax.bench.train import cpu_name

    m = base.model
    tokens = base.steps * base.batch_size * base.seq_len
    seeds = rows[0]["seeds"]
    fp_bytes = rows[0]["packed_bytes"]
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}-{seeds[-1]} ({len(seeds)} per variant)"
    scored = base.eval_batches * base.batch_size * base.seq_len
    lines = [
        f"{m.num_hidden_layers} layers x {m.hidden_size} wide, vocab {m.vocab_size} "
        f"({m.num_params / 1e6:.1f}M parameters); {base.steps} steps of {base.batch_size} x {base.seq_len} tokens "
        f"({tokens / 1e6:.2f}M tokens) per run, {seed_text}, eval loss on {base.eval_batches} held-out batches; "
        f"{cpu_name()} ({jax.default_backend()}, {os.cpu_count()} cores), runs one after another.",
        "",
        "| run | weights | activations | final eval loss | gap to FP | bits/byte | train tokens/s "
        "| bytes | stored as | vs FP | decode tok/s | decode path |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for row in rows:
        acts = "none" if row["act_quant"] == "none" else f"{row['act_quant']}, {row['act_bits']}-bit"
        if row["linear_norm_eps"] is not None:
            acts += f", input norm eps {row['linear_norm_eps']:g}"
        if row["hadamard"]:
            acts += f", Hadamard {'max' if row['hadamard'] == -1 else row['hadamard']}"
            if row["hadamard_seed"] is not None:
                acts += f" with signs of seed {row['hadamard_seed']}"
        label = "full precision (baseline)" if row["baseline"] else row["name"]
        gap = "-" if row["baseline"] else f"{row['gap_to_baseline']:+.3f}"
        lines.append(
            f"| {label} | {row['weight_quant']} | {acts} | "
            f"{_mean_spread(row['final_eval_loss'], row['final_eval_loss_std'])} | {gap} | "
            f"{_mean_spread(row['bits_per_byte'], row['bits_per_byte_std'])} | {row['tokens_per_s']:,.0f} | "
            f"{row['packed_bytes']:,} | {row['stored_as']} | {row['packed_bytes'] / fp_bytes:.2f}x | "
            f"{row['decode_tokens_per_s']:,.0f} | {row['decode_path']} |"
        )
    spread = "" if len(seeds) == 1 else " (mean ± standard deviation over the seeds)"
    lines += [
        "",
        f"Final eval loss{spread}: nats/token at the last step; gap to FP: minus the baseline's (lower is better). "
        f"Bits/byte{spread}: the trained model scored by `research.eval` on the first {scored:,} held-out tokens. "
        "Bytes: what `bitnet-jax convert` writes (sum of the packed arrays: 2-bit codes padded to blocks of 256 "
        "inputs and 4 rows, scales, norms, int8 embedding / lm_head); a variant that cannot be packed counts its "
        f"float32 training parameters. Decode: greedy `generate`, {DECODE_NEW_TOKENS} new tokens after a "
        f"{DECODE_PROMPT_TOKENS}-token prompt, median of {DECODE_REPEATS}, the first seed's model.",
    ]
    return "\n".join(lines)


def _mean_spread(mean: float, std: float) -> str:
    return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


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


def plot_quality_vs_bytes(rows: list[dict], path: str):
    """Bits per byte (mean, with the seeds' spread as error bars) against bytes as served."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        err = None if math.isnan(row["bits_per_byte_std"]) else row["bits_per_byte_std"]
        packed = not row["stored_as"].startswith("float")
        ax.errorbar(
            row["packed_bytes"] / 1e6,
            row["bits_per_byte"],
            yerr=err,
            fmt="o" if packed else "s",
            color="black" if row["baseline"] else ("tab:blue" if packed else "tab:orange"),
            capsize=3,
        )
        label = "full precision" if row["baseline"] else row["name"]
        ax.annotate(
            label,
            (row["packed_bytes"] / 1e6, row["bits_per_byte"]),
            fontsize=6,
            xytext=(4, 2),
            textcoords="offset points",
        )
    ax.set_xscale("log")
    ax.margins(x=0.2)  # room for the labels of the outermost points
    ax.set_xlabel("bytes as served (MB, log scale; circles packed, squares float)")
    ax.set_ylabel("held-out bits per byte (lower is better)")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _with_model(base: RunConfig, **changes) -> RunConfig:
    return dataclasses.replace(base, model=base.model.replace(**changes))


def _settable_keys() -> set[str]:
    return {f.name for f in dataclasses.fields(RunConfig)} | {f.name for f in dataclasses.fields(BitNetConfig)}
