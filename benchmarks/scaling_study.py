"""Scaling study: BitNet b1.58 (ternary) against full precision at three model sizes (issue 16).

What it measures: the held-out loss (nats/token) and bits per byte of models trained from scratch
on the embedded corpus (the Python standard library, `corpus='stdlib'`), at three sizes, in two
kinds that differ only in their quantizers:

  ternary  the b1.58 recipe: absmean ternary weights, one scale per tensor, and absmax 8-bit
           activations per token (weight_quant='tensor', act_quant='token', act_bits=8)
  fp       the same model with quantization off (weight_quant='none', act_quant='none')

How, in two phases, each (size, kind) on its own:
  1. sweep  trained at each of its kind's learning rates with the first seed; while the rate with
            the lowest final held-out loss is at an edge of the sweep, up to `extra_rates` more
            rates a factor SWEEP_STEP beyond it; the lowest-loss rate is that side's best (the
            table flags one still at an edge, where a better one may lie outside);
  2. seeds  trained again at its best rate with the other seeds; the table reports the mean and
            the standard deviation over all seeds at the best rate, and the ternary - fp gap of the
            means with its standard error.
Every run trains the same number of tokens per non-embedding parameter (`Study.tokens_per_param`;
non-embedding: every leaf of the parameter tree but the tied embedding), the same two-stage
schedule as configs/tiny.py (stage-two and floor rates kept at its ratios to the peak rate), on
the same tokenization and, per seed, the same data order. The held-out loss is the run's last
evaluation (up to EVAL_BATCHES batches of held-out windows: all of the split); bits per byte is
`research.ablate.heldout_bits_per_byte` of the trained parameters.

Sizing. The study must run in under 50 minutes on one core (`taskset -c 1`) of a 2-core AMD EPYC,
30 to 36 runs in all. Measured there with a 1024-piece vocabulary and batches of 8 x 128 tokens: about
15,500 training tokens/s at 48 wide x 3 layers and 8,200 at 72 x 4, plus 15-20 s per run for
compilation, evaluation and scoring. At a fixed number of tokens per parameter compute grows with
the square of the size, so the largest size sets the budget: 230K non-embedding parameters at 5
tokens per parameter (1.15M tokens, about 2.5 minutes a run) is what lets its ten runs and those
of the two smaller sizes (25K and 77K, steps of about 3x) finish in about 40 to 45 minutes. The small
vocabulary keeps the output layer (vocab x width per token) from dominating models this narrow,
and small batches give the smallest size about 120 optimizer steps. These are tiny models trained
far short of the b1.58 paper's regime (100B tokens: 33 to 140 tokens per parameter): the numbers
say how the gap behaves at 25K-230K parameters on this corpus, not at 700M-3B.

Outputs in --out:
  runs/<size>_<kind>_lr<rate>_seed<seed>/  each run's folder (`bitnet-jax train` layout:
                  run.json, metrics.jsonl, loss.png, tokenizer.model); its checkpoints are
                  deleted once the run is recorded in results.json, to keep the folder small
  results.json    the study's settings, every run (size, kind, rate, seed, parameters, tokens,
                  final held-out loss, bits per byte, wall seconds) and the summary per size
  results.md      the tables: each (size, kind) at its best rate, and the ternary - fp gaps
  scaling.png     held-out loss against non-embedding parameters (both kinds, error bars the
                  seeds' spread), and the ternary / fp perplexity ratio beside the paper's

Running it again on the same --out skips the runs results.json records (also with other rates,
seeds or extra_rates: only sizes, tokens per parameter and overrides must match); a run killed
midway resumes from its newest checkpoint (`bitnet_jax.train.loop.train`). Its wall seconds are
those of the process that finished it. --quick: two tiny sizes, two rates per kind, two seeds and
2-4 steps a run, to check the plumbing (10-15 s a run for compilation and scoring, 3 minutes in all).

    taskset -c 1 python benchmarks/scaling_study.py --out benchmarks/scaling
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import time

import jax
import numpy as np

from bitnet_jax import init_params
from bitnet_jax.errors import BitNetError
from bitnet_jax.model.config import BitNetConfig
from bitnet_jax.research.ablate import heldout_bits_per_byte, seed_statistics
from bitnet_jax.research.eval import split_documents
from bitnet_jax.train import loop
from bitnet_jax.train.corpus import prepare_corpus
from bitnet_jax.train.run_config import RunConfig, load_run_config
from bitnet_jax.train.run_folder import default_cache_dir, load_run

BASE_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")
KINDS = {
    "ternary": {"weight_quant": "tensor", "act_quant": "token", "act_bits": 8},
    "fp": {"weight_quant": "none", "act_quant": "none"},
}
# Evaluate on every held-out window (the split holds fewer than this many batches).
EVAL_BATCHES = 64
# The b1.58 paper's perplexities (ternary, fp) by model size, as issue 16 quotes them.
PAPER_PERPLEXITY = {700e6: (12.87, 12.33), 1.3e9: (11.29, 11.25), 3e9: (9.91, 10.04)}
# The ratio between neighbouring rates of a sweep, and of an extra rate to the sweep's edge.
SWEEP_STEP = 2.0
# What a recorded run's training depends on besides its name (size, kind, rate, seed): a study
# resumed with other rates, seeds or extra_rates reuses the runs it shares.
RUN_DEFINING_FIELDS = ("sizes", "tokens_per_param", "overrides")


@dataclasses.dataclass(frozen=True)
class Study:
    sizes: dict[str, dict]  # name -> BitNetConfig fields over configs/tiny.py's model
    learning_rates: dict[str, list[float]]  # kind -> the peak rates of its sweep
    seeds: list[int]  # the first trains the sweep
    tokens_per_param: float  # training tokens per non-embedding parameter
    overrides: list[str]  # --set items over configs/tiny.py, for every run
    extra_rates: int  # rates a factor SWEEP_STEP past the sweep's edge, tried while the best is there


STUDY = Study(
    sizes={
        "S": {"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 96},
        "M": {"hidden_size": 48, "num_hidden_layers": 3, "intermediate_size": 128},
        "L": {"hidden_size": 72, "num_hidden_layers": 4, "intermediate_size": 192},
    },
    # Factor-2 steps around configs/tiny.py's 8e-3 (tuned for ternary); full precision usually
    # wants a smaller rate, so its sweep sits one step lower. 4e-3 and 8e-3 are in both.
    learning_rates={"ternary": [4e-3, 8e-3, 1.6e-2], "fp": [2e-3, 4e-3, 8e-3]},
    seeds=[0, 1, 2],
    tokens_per_param=5.0,
    overrides=[
        "model.vocab_size=1024",
        "model.num_attention_heads=4",
        "model.num_key_value_heads=2",
        "batch_size=8",
        "seq_len=128",
        f"eval_batches={EVAL_BATCHES}",
        "keep_checkpoints=1",
    ],
    extra_rates=1,
)
QUICK = dataclasses.replace(
    STUDY,
    sizes={
        "XS": {"hidden_size": 16, "num_hidden_layers": 1, "intermediate_size": 48},
        "S": {"hidden_size": 24, "num_hidden_layers": 1, "intermediate_size": 64},
    },
    learning_rates={"ternary": [4e-3, 8e-3], "fp": [2e-3, 4e-3]},
    seeds=[0, 1],
    tokens_per_param=0.6,
    overrides=[*STUDY.overrides, "eval_batches=2"],
)


@dataclasses.dataclass(frozen=True)
class Planned:
    size: str
    kind: str
    learning_rate: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.size}_{self.kind}_lr{self.learning_rate:g}_seed{self.seed}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--out", required=True, help="folder of the study's runs and results (resumed if it exists)")
    parser.add_argument("--quick", action="store_true", help="a seconds-per-run version that checks the plumbing")
    args = parser.parse_args()
    run_study(QUICK if args.quick else STUDY, args.out)


def run_study(study: Study, out_dir: str):
    """Trains the sweep, then the seeds at each side's best rate (skipping recorded runs), and
    writes results.json, results.md and scaling.png in `out_dir`."""
    results_path = os.path.join(out_dir, "results.json")
    records = _recorded_runs(results_path, study)
    os.makedirs(os.path.join(out_dir, "runs"), exist_ok=True)
    base = load_run_config(BASE_CONFIG, study.overrides)
    cache_dir = default_cache_dir()
    # One tokenizer and token stream for every run, as in an ablation.
    corpus = prepare_corpus(base, out_dir, cache_dir)
    docs = split_documents(corpus.eval_tokens, corpus.tokenizer.eos_id)
    started = time.perf_counter()

    def train_all(planned: list[Planned]):
        for item in planned:
            if item.name in records:
                continue
            print(f"[{time.perf_counter() - started:6.0f} s] {item.name}", flush=True)
            run = run_config(base, study, item)
            records[item.name] = train_and_measure(item, run, os.path.join(out_dir, "runs", item.name), corpus, docs)
            _write_json(results_path, {"study": dataclasses.asdict(study), "runs": list(records.values())})

    # Size by size, so that a study cut short has its smaller sizes complete.
    sweeps = {}  # (size, kind) -> the sweep's rates, ascending
    for size in study.sizes:
        for kind in KINDS:
            rates = sorted(study.learning_rates[kind])
            train_all([Planned(size, kind, lr, study.seeds[0]) for lr in rates])
            # Counted from the study's own rates, so that a resumed study takes the same path.
            for _ in range(study.extra_rates):
                best = best_learning_rate(records, size, kind, rates, study.seeds[0])[0]
                if best == rates[-1]:
                    rates.append(best * SWEEP_STEP)
                elif best == rates[0]:
                    rates.insert(0, best / SWEEP_STEP)
                else:
                    break
                train_all([Planned(size, kind, lr, study.seeds[0]) for lr in rates])
            sweeps[size, kind] = rates
        best = {kind: best_learning_rate(records, size, kind, sweeps[size, kind], study.seeds[0])[0] for kind in KINDS}
        train_all([Planned(size, k, best[k], seed) for k in KINDS for seed in study.seeds[1:]])
    summary = summarise(study, records, sweeps)
    _write_json(results_path, {"study": dataclasses.asdict(study), "runs": list(records.values()), "summary": summary})
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(results_tables(study, base, summary) + "\n")
    plot_scaling(summary, os.path.join(out_dir, "scaling.png"))
    print(f"Done in {time.perf_counter() - started:.0f} s (this process); results in {out_dir}")


def run_config(base: RunConfig, study: Study, item: Planned) -> RunConfig:
    """The run of one (size, kind, rate, seed): its model, its step count for the study's tokens
    per parameter, and the tiny config's schedule scaled to the run's length and peak rate."""
    model = model_config(base, study, item.size, item.kind)
    tokens_per_step = base.batch_size * base.seq_len
    steps = max(2, round(study.tokens_per_param * non_embedding_params(model) / tokens_per_step))
    return dataclasses.replace(
        base,
        model=model,
        seed=item.seed,
        steps=steps,
        warmup_steps=max(1, round(steps * base.warmup_steps / base.steps)),
        learning_rate=item.learning_rate,
        stage2_learning_rate=item.learning_rate * base.stage2_learning_rate / base.learning_rate,
        min_learning_rate=item.learning_rate * base.min_learning_rate / base.learning_rate,
        eval_every=steps,  # one evaluation at the end (and the loop's own at step 0)
        log_every=max(1, steps // 10),
        checkpoint_every=max(1, steps // 4),  # what a killed run loses
    )


def model_config(base: RunConfig, study: Study, size: str, kind: str) -> BitNetConfig:
    # head_dim=None: derived from the new width (the base model's is fixed at tiny's width).
    return base.model.replace(**study.sizes[size], **KINDS[kind], head_dim=None)


def non_embedding_params(model: BitNetConfig) -> int:
    """Parameters outside the token embedding (tied with the output layer), from the tree."""
    if not model.tie_word_embeddings:
        raise BitNetError("The study counts parameters of models with tied embeddings only (tiny's).")
    tree = jax.eval_shape(lambda: init_params(model))
    return sum(leaf.size for name, leaf in tree.items() if name != "embed_tokens" for leaf in jax.tree.leaves(leaf))


def all_params(model: BitNetConfig) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(jax.eval_shape(lambda: init_params(model))))


def train_and_measure(item: Planned, run: RunConfig, run_dir: str, corpus, docs: list[np.ndarray]) -> dict:
    """Trains (or resumes) one run, scores its bits per byte, deletes its checkpoints and returns
    its record."""
    start = time.perf_counter()
    final = loop.train(run, run_dir, corpus=corpus, progress=False)
    _, params, _ = load_run(run_dir)
    bits_per_byte = heldout_bits_per_byte(run, params, corpus.tokenizer, docs)
    wall_seconds = time.perf_counter() - start
    shutil.rmtree(os.path.join(run_dir, "checkpoints"))
    return {
        "name": item.name,
        "size": item.size,
        "kind": item.kind,
        "learning_rate": item.learning_rate,
        "seed": item.seed,
        "layers": run.model.num_hidden_layers,
        "width": run.model.hidden_size,
        "params": all_params(run.model),
        "non_embedding_params": non_embedding_params(run.model),
        "steps": run.steps,
        "tokens": run.steps * run.batch_size * run.seq_len,
        "final_eval_loss": final["eval_loss"],
        "bits_per_byte": bits_per_byte,
        "wall_seconds": wall_seconds,
    }


def best_learning_rate(
    records: dict[str, dict], size: str, kind: str, rates: list[float], seed: int
) -> tuple[float, dict[float, float]]:
    """(the rate of the lowest final held-out loss, {rate: loss}) over the sweep's runs of (size,
    kind) at `rates` with `seed` (the sweep's)."""
    sweep = {lr: records[Planned(size, kind, lr, seed).name]["final_eval_loss"] for lr in rates}
    return min(sweep, key=sweep.get), sweep


def summarise(study: Study, records: dict[str, dict], sweeps: dict[tuple[str, str], list[float]]) -> list[dict]:
    """Per size: each kind at its best rate (mean and spread over seeds) and the ternary - fp gaps."""
    summary = []
    for size in study.sizes:
        row = {"size": size}
        for kind in KINDS:
            best, sweep = best_learning_rate(records, size, kind, sweeps[size, kind], study.seeds[0])
            runs = [records[Planned(size, kind, best, seed).name] for seed in study.seeds]
            losses = [r["final_eval_loss"] for r in runs]
            bpbs = [r["bits_per_byte"] for r in runs]
            row.update({key: runs[0][key] for key in ("layers", "width", "params", "non_embedding_params", "tokens")})
            row[kind] = {
                "best_learning_rate": best,
                "best_at_sweep_edge": best in (min(sweep), max(sweep)),
                "sweep_losses": {f"{lr:g}": loss for lr, loss in sweep.items()},
                "seeds": [r["seed"] for r in runs],
                **seed_statistics(losses, bpbs),
            }
        for key, gap_key in (("final_eval_loss", "loss_gap"), ("bits_per_byte", "bits_per_byte_gap")):
            t, f = row["ternary"], row["fp"]
            row[gap_key] = t[key] - f[key]
            row[f"{gap_key}_stderr"] = math.sqrt(
                t[f"{key}_std"] ** 2 / len(t["seeds"]) + f[f"{key}_std"] ** 2 / len(f["seeds"])
            )
        # exp(loss gap) is the ratio of the perplexities, the paper's numbers' unit.
        row["perplexity_ratio"] = math.exp(row["loss_gap"])
        summary.append(row)
    return summary


def results_tables(study: Study, base: RunConfig, summary: list[dict]) -> str:
    """results.md: the setup, each (size, kind) at its best rate, and the gaps beside the paper's."""
    from bitnet_jax.bench.train import cpu_name

    lines = [
        f"Vocabulary {base.model.vocab_size}, batches of {base.batch_size} x {base.seq_len} tokens, "
        f"{study.tokens_per_param:g} training tokens per non-embedding parameter; peak-rate sweeps with seed "
        f"{study.seeds[0]} (ternary {_rates(study.learning_rates['ternary'])}, fp "
        f"{_rates(study.learning_rates['fp'])}, and up to {study.extra_rates} more a factor {SWEEP_STEP:g} past "
        f"an edge winner), then more seeds at each side's best rate (the seeds column counts them); corpus "
        f"`{base.corpus}`; {cpu_name()}, one core.",
        "",
        "| size | layers x width | non-emb params | params | tokens | kind | sweep: loss at each rate | best rate "
        "| seeds | held-out loss | bits/byte |",
        "|---|---|---:|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for row in summary:
        for kind in KINDS:
            k = row[kind]
            sweep = ", ".join(f"{lr}: {loss:.3f}" for lr, loss in k["sweep_losses"].items())
            edge = " (edge)" if k["best_at_sweep_edge"] else ""
            lines.append(
                f"| {row['size']} | {row['layers']} x {row['width']} | {row['non_embedding_params']:,} | "
                f"{row['params']:,} | {row['tokens']:,} | {kind} | {sweep} | {k['best_learning_rate']:g}{edge} | "
                f"{len(k['seeds'])} | "
                f"{_mean_spread(k['final_eval_loss'], k['final_eval_loss_std'])} | "
                f"{_mean_spread(k['bits_per_byte'], k['bits_per_byte_std'])} |"
            )
    lines += [
        "",
        "| size | non-emb params | loss gap ternary - fp (nats) | perplexity ratio ternary / fp | "
        "bits/byte gap ternary - fp |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in summary:
        lines.append(
            f"| {row['size']} | {row['non_embedding_params']:,} | "
            f"{_mean_spread(row['loss_gap'], row['loss_gap_stderr'], sign=True)} | {row['perplexity_ratio']:.3f} | "
            f"{_mean_spread(row['bits_per_byte_gap'], row['bits_per_byte_gap_stderr'], sign=True)} |"
        )
    for size, (ternary, fp) in PAPER_PERPLEXITY.items():
        lines.append(f"| b1.58 paper {size / 1e9:g}B | - | {math.log(ternary / fp):+.3f} | {ternary / fp:.3f} | - |")
    lines += [
        "",
        "Held-out loss: nats/token at the last step on the whole held-out split; bits/byte: the trained model "
        "scored by `research.eval`; mean ± standard deviation over the seeds at the best rate, which is the "
        "lowest-loss rate of the sweep's seed ((edge): at the end of its sweep). Gaps: difference of the means "
        "± its standard error; perplexity ratio: exp(loss gap). The paper's rows are its perplexities (ternary "
        "vs fp, 100B tokens, model sizes in total parameters) in the same units.",
    ]
    return "\n".join(lines)


def _rates(rates: list[float]) -> str:
    return "/".join(f"{lr:g}" for lr in rates)


def _mean_spread(mean: float, spread: float, sign: bool = False) -> str:
    text = f"{mean:+.3f}" if sign else f"{mean:.3f}"
    return text if math.isnan(spread) else f"{text} ± {spread:.3f}"


def plot_scaling(summary: list[dict], path: str):
    """Left: held-out loss against non-embedding parameters, both kinds, error bars the seeds'
    spread. Right: the ternary / fp perplexity ratio against parameters, ours and the paper's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, ratio_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    params = [row["non_embedding_params"] for row in summary]
    for kind, style in (("ternary", dict(color="tab:blue", fmt="o-")), ("fp", dict(color="black", fmt="s--"))):
        losses = [row[kind]["final_eval_loss"] for row in summary]
        errors = [
            0.0 if math.isnan(row[kind]["final_eval_loss_std"]) else row[kind]["final_eval_loss_std"] for row in summary
        ]
        label = "ternary (b1.58)" if kind == "ternary" else "full precision"
        loss_ax.errorbar(params, losses, yerr=errors, capsize=3, label=label, **style)
    loss_ax.set_xscale("log")
    loss_ax.set_xlabel("non-embedding parameters (log scale)")
    loss_ax.set_ylabel("held-out cross-entropy (nats/token)")
    loss_ax.set_title("each side at its best learning rate", fontsize=9)
    loss_ax.legend()
    loss_ax.grid(alpha=0.3, which="both")

    ratios = [row["perplexity_ratio"] for row in summary]
    # The ratio's error bar: exp of the loss gap's standard error, as a band around the ratio.
    low = [r - math.exp(row["loss_gap"] - _zero_if_nan(row["loss_gap_stderr"])) for r, row in zip(ratios, summary)]
    high = [math.exp(row["loss_gap"] + _zero_if_nan(row["loss_gap_stderr"])) - r for r, row in zip(ratios, summary)]
    ratio_ax.errorbar(params, ratios, yerr=[low, high], fmt="o-", color="tab:blue", capsize=3, label="this study")
    paper_sizes = list(PAPER_PERPLEXITY)
    ratio_ax.plot(
        paper_sizes, [t / f for t, f in PAPER_PERPLEXITY.values()], "D-", color="tab:red", label="b1.58 paper"
    )
    ratio_ax.axhline(1.0, color="gray", linewidth=1)
    ratio_ax.set_xscale("log")
    ratio_ax.set_xlabel("parameters (log; ours non-embedding, the paper's model size)")
    ratio_ax.set_ylabel("perplexity ratio ternary / full precision")
    ratio_ax.legend()
    ratio_ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _zero_if_nan(value: float) -> float:
    return 0.0 if math.isnan(value) else value


def _recorded_runs(path: str, study: Study) -> dict[str, dict]:
    """The runs results.json records, by name; refuses those of a study whose runs train otherwise."""
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        previous = json.load(f)
    ours = dataclasses.asdict(study)
    changed = [k for k in RUN_DEFINING_FIELDS if previous["study"][k] != ours[k]]
    if changed:
        raise BitNetError(
            f"{path} records runs of a study with other {', '.join(changed)} (--quick, or an edited script): "
            "use another --out folder."
        )
    return {r["name"]: r for r in previous["runs"]}


def _write_json(path: str, value: dict):
    """Writes through a temporary file, so that a kill leaves the previous results.json whole."""
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=2)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
