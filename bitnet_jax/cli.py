"""The `bitnet-jax` command line: `train` a model from scratch, `generate` text from one.

    bitnet-jax train --config configs/tiny.py [--set key=value ...] [--out DIR]
    bitnet-jax generate --model DIR --prompt TEXT [--max-new-tokens N] [--temperature T]
    bitnet-jax bench train [--config FILE] [--set key=value ...] [--repeats N] [--json FILE]
    bitnet-jax ablate --config FILE --grid key=v1,v2 [--grid ...] [--steps N] [--set key=value ...] [--out DIR]

Errors caused by the input (`BitNetError`) print one message and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    from .errors import BitNetError

    try:
        return args.func(args)
    except BitNetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitnet-jax", description="BitNet b1.58 ternary language models in JAX.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model from scratch (resumes if --out holds a run)")
    train.add_argument("--config", help="a Python run config defining get_config(), e.g. configs/tiny.py")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set steps=100 --set model.weight_quant=channel")
    train.add_argument("--out", help="run folder (default: runs/<config name>)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=_train)

    gen = commands.add_parser("generate", help="generate text from a run folder or a Hugging Face BitNet folder")
    gen.add_argument("--model", required=True, help="a bitnet-jax run folder or a local Hugging Face BitNet folder")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--verbose", action="store_true", help="print timing after the text")
    gen.set_defaults(func=_generate)

    bench = commands.add_parser("bench", help="benchmarks, measured side by side in one run")
    benches = bench.add_subparsers(dest="bench", required=True)
    bench_train = benches.add_parser("train", help="train-step time of QAT against the same model in full precision")
    bench_train.add_argument("--config", help="a run config (default: the tiny preset with RunConfig defaults)")
    bench_train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as for train")
    bench_train.add_argument("--repeats", type=int, default=5, help="timed steps per side (default 5)")
    bench_train.add_argument("--json", help="also write the timings to this JSON file")
    bench_train.set_defaults(func=_bench_train)

    ablate = commands.add_parser("ablate", help="train a grid of quantizer settings and a full-precision baseline")
    ablate.add_argument("--config", help="a Python run config, e.g. configs/tiny.py (the base of every run)")
    ablate.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="quantizer values to combine, e.g. --grid weight_quant=tensor,channel,group:64 "
                             "--grid act_quant=token,tensor --grid act_bits=8,4")
    ablate.add_argument("--steps", type=int, help="training steps of every run (default: the config's)")
    ablate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as for train, for all runs")
    ablate.add_argument("--out", default=os.path.join("runs", "ablate"), help="ablation folder (default runs/ablate)")
    ablate.add_argument("--no-progress", action="store_true", help="no progress bars")
    ablate.set_defaults(func=_ablate)
    return parser


def _train(args) -> int:
    from .run_config import load_run_config
    from .train import train

    run = load_run_config(args.config, args.set)
    name = os.path.splitext(os.path.basename(args.config))[0] if args.config else "default"
    out = args.out or os.path.join("runs", name)
    final = train(run, out, progress=not args.no_progress)
    print(f"Done: step {final.get('step')}, eval loss {final.get('eval_loss', float('nan')):.3f}. "
          f"Run folder: {out} (metrics.jsonl, loss.png, checkpoints/).")
    return 0


def _generate(args) -> int:
    import numpy as np

    from .generate import generate
    from .tokenizer import StreamDecoder

    config, params, tokenizer = load_model(args.model)
    prompt_ids = tokenizer.encode(args.prompt)
    if tokenizer.bos_id is not None:
        prompt_ids = [tokenizer.bos_id] + prompt_ids
    stream = StreamDecoder(tokenizer)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    first_token_at = []

    def on_tokens(tokens_b):
        first_token_at.append(time.perf_counter())
        token = int(np.asarray(tokens_b)[0])
        if token not in config.eos_ids:
            sys.stdout.write(stream.push(token))
            sys.stdout.flush()

    start = time.perf_counter()
    new_ids = generate(config, params, [prompt_ids], args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_ids=config.eos_ids,
                       on_tokens=on_tokens)
    end = time.perf_counter()
    sys.stdout.write(stream.flush() + "\n")
    if args.verbose:
        produced = int(np.sum(~np.isin(new_ids[0], config.eos_ids))) + 1
        decode_s = end - first_token_at[0] if first_token_at else 0.0
        print(f"[{len(prompt_ids)} prompt tokens, {produced} new; first token after {first_token_at[0] - start:.2f} s "
              f"(compile included); {max(len(first_token_at) - 1, 0) / max(decode_s, 1e-9):.1f} tokens/s after]",
              file=sys.stderr)
    return 0


def _bench_train(args) -> int:
    import dataclasses
    import json

    from .bench import bench_train, train_table
    from .run_config import load_run_config

    run = load_run_config(args.config, args.set)
    timings = bench_train(run, repeats=args.repeats)
    print(train_table(run, timings))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(t) for t in timings], f, indent=2)
    return 0


def _ablate(args) -> int:
    from .ablate import ablate, load_ablation

    base, grid = load_ablation(args.config, args.set, args.grid, args.steps)
    ablate(base, grid, args.out, progress=not args.no_progress)
    with open(os.path.join(args.out, "results.md")) as f:
        print(f.read(), end="")
    print(f"Ablation folder: {args.out} (results.md, results.json, loss_curves.png, one run folder per row).")
    return 0


def load_model(path: str):
    """(config, params, tokenizer) from a bitnet-jax run folder or a Hugging Face BitNet folder."""
    from .hf import load_hf
    from .tokenizer import load_tokenizer
    from .train import is_run_folder, load_run

    if is_run_folder(path):
        run, params, tokenizer = load_run(path)
        return run.model, params, tokenizer
    config, params = load_hf(path)
    return config, params, load_tokenizer(path, bos_id=config.bos_token_id, eos_id=(config.eos_ids or (None,))[0])


if __name__ == "__main__":
    sys.exit(main())
