"""The `bitnet-jax` command line: `train` a model from scratch, `generate` text from one.

    bitnet-jax train --config configs/tiny.py [--set key=value ...] [--out DIR] [--init SRC]
        [--coordinator-address HOST:PORT --num-processes N --process-id I | --distributed]
    bitnet-jax generate --model DIR --prompt TEXT [--max-new-tokens N] [--temperature T]
    bitnet-jax bench train [--config FILE] [--set key=value ...] [--repeats N] [--json FILE]
    bitnet-jax tokenize --corpus SOURCE --out DIR [--tokenizer PATH | --vocab-size N]
    bitnet-jax convert SRC DST [--lm-head int8|int8-tied|int4|int4-tied|float]
    bitnet-jax convert SRC OUT.gguf --format i2_s|tq2_0|tq1_0 [--lm-head f16|q8_0|q6_k]
    bitnet-jax export-hf SRC OUT [--packed] [--dtype bfloat16|float32] [--force]
    bitnet-jax chat --model DIR [--temperature T --top-k K --top-p P] [--system TEXT]
    bitnet-jax serve --model DIR [--host 127.0.0.1] [--port 8000] [--max-batch 8] [--api-key KEY]
    bitnet-jax bench kernels [--threads N] [--json FILE]
    bitnet-jax bench generate --preset b1.58-2b4t --random-weights [--threads N] [--json FILE]
    bitnet-jax bench serve --preset b1.58-2b4t --random-weights [--clients 1,2,4,8] [--json FILE]
    bitnet-jax ablate --config FILE --grid key=v1,v2 [--grid ...] [--steps N] [--seeds N] [--set k=v ...] [--out DIR]
    bitnet-jax eval --model SRC [--corpus SPEC] [--max-tokens N] [--context W --stride S] [--json FILE]
    bitnet-jax lm-eval --model bitnet-jax --model_args pretrained=DIR --tasks ... (lm_eval's arguments)

Errors caused by the input (`BitNetError`) print one message and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time

from bitnet_jax.kernels.ops import BACKENDS, KV_CACHES, LM_HEADS


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:  # the rest is lm-eval's own command line: argparse would claim its --model
        args = argparse.Namespace(func=_lm_eval, lm_eval_args=argv[1:])
    else:
        args = parser.parse_args(argv)
    from bitnet_jax.errors import BitNetError

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
    _add_set(train, "override a config field, e.g. --set steps=100 --set model.weight_quant=channel")
    train.add_argument("--out", help="run folder (default: runs/<config name>)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    multi = train.add_argument_group(
        "multi-process training",
        "Start one process per host (or per GPU) with the same arguments except "
        "--process-id; the mesh then spans the devices of all of them. Unset flags fall back to the environment "
        "variables named.",
    )
    multi.add_argument(
        "--coordinator-address",
        default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
        metavar="HOST:PORT",
        help="process 0's address and a free port ($JAX_COORDINATOR_ADDRESS)",
    )
    multi.add_argument(
        "--num-processes",
        type=int,
        default=_env_int("JAX_NUM_PROCESSES"),
        help="how many processes take part ($JAX_NUM_PROCESSES)",
    )
    multi.add_argument(
        "--process-id",
        type=int,
        default=_env_int("JAX_PROCESS_ID"),
        help="this process's rank, 0 .. N-1 ($JAX_PROCESS_ID)",
    )
    multi.add_argument(
        "--distributed",
        action="store_true",
        help="multi-process with every setting detected by JAX (Slurm, Open MPI, Cloud TPU, Kubernetes)",
    )
    train.add_argument(
        "--init",
        metavar="SRC",
        help="fine-tune: start from this model (Hugging Face, run or packed folder, or GGUF file); its "
        "architecture and tokenizer are the run's",
    )
    train.set_defaults(func=_train)

    gen = commands.add_parser("generate", help="generate text from a run folder or a Hugging Face BitNet folder")
    gen.add_argument("--model", required=True, help="a bitnet-jax run folder or a local Hugging Face BitNet folder")
    gen.add_argument("--prompt", required=True)
    _add_sampling(gen, max_new_tokens=64)
    gen.add_argument("--seed", type=int, default=0)
    _add_backend(
        gen,
        "ffi: our C++ ternary kernels (CPU only); xla: XLA ops only; pallas: decode's ternary matmuls "
        "as a Pallas kernel (NVIDIA GPUs) (default: ffi for packed folders on CPU, xla on GPU / TPU "
        "and for training parameters)",
    )
    _add_kv_cache(gen)
    _add_compilation_cache(gen)
    gen.add_argument("--verbose", action="store_true", help="print time to first token and tokens/s")
    gen.set_defaults(func=_generate)

    convert = commands.add_parser("convert", help="pack a model (run folder or HF BitNet folder) for serving")
    convert.add_argument("src", help="a bitnet-jax run or packed folder, a Hugging Face BitNet folder or a GGUF file")
    convert.add_argument("dst", help="the packed folder to write (with --format: the .gguf file)")
    convert.add_argument(
        "--lm-head",
        choices=(*LM_HEADS, "f16", "q8_0", "q6_k"),
        default=None,
        help="int8: per-row int8 lm_head; int8-tied: also the tied input embedding (the "
        "default for tied models; int8 otherwise); int4, int4-tied: the same with 4-bit codes and a "
        "float16 scale per 32 inputs (44%% fewer bytes, more error); float: as it is; f16 (default), q8_0, "
        "q6_k: for a .gguf DST",
    )
    convert.add_argument(
        "--format", choices=("i2_s", "tq2_0", "tq1_0"), default=None, help="DST is a GGUF file of this type"
    )
    convert.add_argument(
        "--i2s-layout",
        choices=("x86", "arm"),
        default="x86",
        help="the I2_S code layout of a GGUF file read or written: that of a bitnet.cpp built for x86 (default; "
        "also its converter's) or for ARM (its llama-quantize there); the file does not say which",
    )
    convert.set_defaults(func=_convert)

    export_hf = commands.add_parser(
        "export-hf", help="write a Hugging Face BitNet folder (transformers' BitNetForCausalLM loads it)"
    )
    export_hf.add_argument("src", help="a bitnet-jax run or packed folder, a Hugging Face BitNet folder or a GGUF file")
    export_hf.add_argument("out", help="the folder to write")
    export_hf.add_argument(
        "--packed", action="store_true", help="ternary weights packed 4 per byte with one scale each (offline)"
    )
    export_hf.add_argument(
        "--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="master weights' dtype (default bf16)"
    )
    export_hf.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")
    export_hf.set_defaults(func=_export_hf)

    chat = commands.add_parser("chat", help="interactive chat with a model (chat template from tokenizer_config.json)")
    chat.add_argument("--model", required=True, help="a packed, run or Hugging Face folder")
    _add_sampling(chat, max_new_tokens=256)
    chat.add_argument("--system", default=None, help="a system message")
    _add_compilation_cache(chat)
    chat.set_defaults(func=_chat)

    srv = commands.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching and a chat page")
    srv.add_argument("--model", required=True, help="a packed, run or Hugging Face folder")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--max-batch", type=int, default=8, help="slots decoded together in one step (default 8)")
    srv.add_argument("--max-context", type=int, default=2048, help="prompt + reply tokens per slot (default 2048)")
    srv.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429 (default 64)")
    _add_kv_cache_tokens(srv)
    _add_prefill_chunk(srv)
    srv.add_argument(
        "--prefix-cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep finished requests' KV pages until needed, so that a prompt that begins with one of them "
        "(a conversation's next turn) prefills only the rest (default: on)",
    )
    srv.add_argument(
        "--api-key",
        default=os.environ.get("BITNET_JAX_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 ($BITNET_JAX_API_KEY)",
    )
    srv.add_argument("--model-name", help="the model's name in the API (default: the folder's name)")
    _add_backend(srv, "as for generate")
    _add_kv_cache(srv)
    _add_compilation_cache(srv)
    srv.add_argument("--shutdown-timeout", type=float, default=10.0, help="seconds in-flight requests get on Ctrl-C")
    srv.set_defaults(func=_serve)

    bench = commands.add_parser("bench", help="benchmarks, measured side by side in one run")
    benches = bench.add_subparsers(dest="bench", required=True)
    bench_train = benches.add_parser("train", help="train-step time of QAT against the same model in full precision")
    bench_train.add_argument("--config", help="a run config (default: the tiny preset with RunConfig defaults)")
    _add_set(bench_train, "as for train")
    bench_train.add_argument("--repeats", type=int, default=5, help="timed steps per side (default 5)")
    _add_json(bench_train, "timings")
    bench_train.set_defaults(func=_bench_train)
    bench_kernels = benches.add_parser(
        "kernels", help="ternary / int8 FFI kernels against XLA's dense dot, 2B4T shapes"
    )
    _add_threads(bench_kernels)
    bench_kernels.add_argument("--rows", default="1,8,128", help="activation rows M (default 1,8,128)")
    bench_kernels.add_argument(
        "--shapes",
        default=None,
        help="comma-separated KxN weight shapes, e.g. 2560x6912,6912x2560 (default: 2B4T's linears and lm_head)",
    )
    bench_kernels.add_argument(
        "--isa", default=None, help="comma-separated kernel paths (default: the SIMD paths this CPU runs)"
    )
    bench_kernels.add_argument("--repeats", type=int, default=5)
    _add_read_buffer(bench_kernels)
    _add_json(bench_kernels, "timings")
    bench_kernels.set_defaults(func=_bench_kernels)
    bench_gen = benches.add_parser("generate", help="prefill / decode speed and memory, FFI vs XLA dense")
    _add_random_model(bench_gen, "random weights of the preset's shape, built in memory (no download)")
    bench_gen.add_argument(
        "--backends",
        default="ffi,xla",
        help="comma-separated: ffi, xla (dense float weights), xla-packed (the packed weights on the XLA integer "
        "path), pallas (the packed weights on the Pallas ternary kernel: for GPUs) (default ffi,xla)",
    )
    bench_gen.add_argument(
        "--weight-quant",
        default=None,
        help="the model's weight scales, e.g. group:64 (default: the preset's, one per tensor)",
    )
    _add_lm_head(bench_gen, "the FFI model's lm_head")
    _add_kv_cache(bench_gen)
    _add_compilation_cache(bench_gen)
    bench_gen.add_argument(
        "--prompt-tokens",
        default="128",
        help="prompt length, or comma-separated lengths (e.g. 128,2048) timed in turns in one process, with decode "
        "after each against decode after the shortest (default 128)",
    )
    bench_gen.add_argument("--new-tokens", type=int, default=128, help="decoded tokens timed, FFI (default 128)")
    bench_gen.add_argument(
        "--xla-new-tokens", type=int, default=16, help="decoded tokens timed on the (slow) XLA dense path (default 16)"
    )
    bench_gen.add_argument("--xla-dtype", choices=("float32", "bfloat16"), default="float32")
    bench_gen.add_argument("--temperature", type=float, default=0.0, help="sample every token so (default 0: greedy)")
    bench_gen.add_argument("--top-k", type=int, default=None, help="with --temperature, as for generate")
    bench_gen.add_argument("--top-p", type=float, default=None, help="with --temperature, as for generate")
    bench_gen.add_argument("--repeats", type=int, default=3)
    _add_read_buffer(bench_gen)
    bench_gen.add_argument(
        "--profile", action="store_true", help="FFI: also time each piece of a decode step alone (per-token breakdown)"
    )
    _add_json(bench_gen, "results")
    bench_gen.set_defaults(func=_bench_generate)
    bench_srv = benches.add_parser("serve", help="the HTTP server under 1, 2, 4, 8 concurrent streaming clients")
    _add_random_model(bench_srv, "as for bench generate")
    bench_srv.add_argument("--clients", default="1,2,4,8", help="concurrent clients per level (default 1,2,4,8)")
    bench_srv.add_argument(
        "--prompt-tokens",
        default="128",
        help="each prompt's length, or a range such as 20-250 to draw each from (default 128)",
    )
    bench_srv.add_argument("--new-tokens", type=int, default=128)
    bench_srv.add_argument(
        "--max-context", type=int, default=2048, help="prompt + reply tokens per slot (default 2048)"
    )
    bench_srv.add_argument(
        "--temperature", type=float, default=0.0, help="each request's sampling temperature (default 0: greedy)"
    )
    bench_srv.add_argument("--top-p", type=float, default=1.0, help="each request's top_p (default 1)")
    _add_kv_cache_tokens(bench_srv)
    _add_prefill_chunk(bench_srv)
    _add_lm_head(bench_srv, "the model's lm_head")
    _add_kv_cache(bench_srv)
    _add_read_buffer(bench_srv)
    _add_json(bench_srv, "results")
    bench_srv.set_defaults(func=_bench_serve)

    tok = commands.add_parser("tokenize", help="pre-tokenize a corpus once into an ArrayRecord token folder")
    tok.add_argument(
        "--corpus",
        required=True,
        help="one source as in a run config: a folder, 'jsonl:PATH', 'parquet:PATH', or a dict such as "
        "\"{'kind': 'jsonl', 'path': 'a.jsonl', 'field': 'content'}\"",
    )
    tok.add_argument("--out", required=True, help="the token folder to write (train with corpus='array_record:DIR')")
    tok.add_argument("--tokenizer", help="tokenizer.json / tokenizer.model or a folder with one (e.g. a run folder)")
    tok.add_argument(
        "--vocab-size",
        type=int,
        default=4096,
        help="without --tokenizer: train a sentencepiece tokenizer of this size (default 4096)",
    )
    tok.add_argument("--seed", type=int, default=0, help="seed of that tokenizer's training")
    tok.set_defaults(func=_tokenize)

    ablate = commands.add_parser("ablate", help="train a grid of quantizer settings and a full-precision baseline")
    ablate.add_argument("--config", help="a Python run config, e.g. configs/tiny.py (the base of every run)")
    ablate.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="quantizer values to combine, e.g. --grid weight_quant=tensor,channel,group:64 "
        "--grid act_quant=token,tensor --grid act_bits=8,4",
    )
    ablate.add_argument("--steps", type=int, help="training steps of every run (default: the config's)")
    ablate.add_argument(
        "--seeds", type=int, default=1, help="seeds per variant: the config's seed, seed+1, ... (default 1)"
    )
    _add_set(ablate, "as for train, for all runs")
    ablate.add_argument("--out", default=os.path.join("runs", "ablate"), help="ablation folder (default runs/ablate)")
    ablate.add_argument("--no-progress", action="store_true", help="no progress bars")
    ablate.set_defaults(func=_ablate)

    ev = commands.add_parser("eval", help="cross-entropy, perplexity and bits per byte of a model on a corpus")
    ev.add_argument("--model", required=True, help="a run, packed or Hugging Face folder")
    ev.add_argument(
        "--corpus",
        help="a corpus spec as in a run config (all its documents); default: the run folder's held-out split",
    )
    ev.add_argument("--max-tokens", type=int, help="score at most this many tokens (documents in order)")
    ev.add_argument("--context", type=int, help="window length W (default: the run's seq_len, else the model's)")
    ev.add_argument("--stride", type=int, help="tokens a window advances by (default W/2); 1..W")
    ev.add_argument("--batch-size", type=int, help="windows of W tokens per batch (default: by logits memory)")
    _add_backend(ev, "packed models: as for generate")
    _add_json(ev, "report")
    ev.set_defaults(func=_eval)
    lm_eval = commands.add_parser(
        "lm-eval",
        help="EleutherAI's lm_eval command with the bitnet-jax model registered (needs the 'eval' extra)",
        add_help=False,
    )
    lm_eval.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    lm_eval.set_defaults(func=_lm_eval)
    return parser


# Arguments that several commands share, each group declared once.


def _add_set(parser: argparse.ArgumentParser, help: str) -> None:
    """--set KEY=VALUE, repeatable: run config overrides (train, bench train, ablate)."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=help)


def _add_sampling(parser: argparse.ArgumentParser, *, max_new_tokens: int) -> None:
    """How many tokens to generate and how to pick them (generate, chat)."""
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)


def _add_backend(parser: argparse.ArgumentParser, help: str) -> None:
    """--backend for packed models (generate, serve, eval); unset, `ops.serving_backend` decides."""
    parser.add_argument("--backend", choices=BACKENDS, default=None, help=help)


def _add_lm_head(parser: argparse.ArgumentParser, what: str) -> None:
    """--lm-head for the benchmarks on random weights (bench generate, bench serve)."""
    parser.add_argument(
        "--lm-head", choices=LM_HEADS, default=None, help=f"{what} (default: the serving default, int8-tied for 2B4T)"
    )


def _add_kv_cache_tokens(parser: argparse.ArgumentParser) -> None:
    """--kv-cache-tokens for the batching server (serve, bench serve)."""
    parser.add_argument(
        "--kv-cache-tokens",
        type=int,
        help="KV cache slots shared by all slots, in pages of 256 (default max-batch x max-context); "
        "fewer bound the memory, and requests wait for the pages they need",
    )


def _add_prefill_chunk(parser: argparse.ArgumentParser) -> None:
    """--prefill-chunk for the batching server (serve, bench serve)."""
    parser.add_argument(
        "--prefill-chunk",
        type=int,
        choices=(64, 128, 192, 256),
        help="prompt tokens read per engine step where the FFI kernel attends (default 64); decoding "
        "requests get a token after each chunk, so longer chunks make them wait longer while a prompt "
        "is read, and make a conversation's next turn slower",
    )


def _add_kv_cache(parser: argparse.ArgumentParser) -> None:
    """--kv-cache for serving (generate, serve, bench generate)."""
    parser.add_argument(
        "--kv-cache",
        choices=KV_CACHES,
        default=None,
        help="the KV cache's dtype (default float32; int8, with a scale per slot and kv head, takes a quarter of "
        "its memory and of the bytes a decoded token reads at long context)",
    )


def _add_compilation_cache(parser: argparse.ArgumentParser) -> None:
    """--compilation-cache for serving (generate, chat, serve, bench generate)."""
    parser.add_argument(
        "--compilation-cache",
        default=None,
        metavar="DIR|off",
        help="JAX's persistent compilation cache: a later run with the same model shape skips the compiler, "
        "starting sooner with less memory (default: under $BITNET_JAX_CACHE or ~/.cache/bitnet_jax, per "
        "jax version and kernel build; $JAX_COMPILATION_CACHE_DIR, if set, wins)",
    )


def _add_threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, help="CPUs to use (default: all allowed)")


def _add_random_model(parser: argparse.ArgumentParser, random_weights_help: str) -> None:
    """The model a benchmark builds in memory, and the CPUs it runs on (bench generate, bench serve)."""
    parser.add_argument("--preset", default="b1.58-2b4t", help="model shape (default b1.58-2b4t)")
    parser.add_argument("--random-weights", action="store_true", required=True, help=random_weights_help)
    _add_threads(parser)


def _add_read_buffer(parser: argparse.ArgumentParser) -> None:
    """The buffer that measures this machine's read bandwidth (bench kernels, generate, serve)."""
    parser.add_argument(
        "--read-buffer-mb",
        type=int,
        default=None,
        help="MB read to measure this machine's read bandwidth (default: 1 GiB, or 8x the last-level cache)",
    )


def _add_json(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--json", help=f"also write the {what} to this JSON file")


def _export_hf(args) -> int:
    from bitnet_jax.interop.hf import generation_stop_ids
    from bitnet_jax.interop.hf_export import export_hf
    from bitnet_jax.serve.chat import chat_template
    from bitnet_jax.serve.load import load_model

    config, params, tokenizer = load_model(args.src)
    stops = generation_stop_ids(args.src, config) if os.path.isdir(args.src) else config.eos_ids
    export_hf(
        config,
        params,
        tokenizer,
        args.out,
        packed=args.packed,
        dtype=args.dtype,
        chat_template=chat_template(args.src),
        stop_ids=stops,
        force=args.force,
    )
    kind = "packed ternary weights" if args.packed else f"{args.dtype} master weights"
    print(f"Exported {args.src} -> {args.out} (Hugging Face BitNet folder, {kind}).")
    return 0


def _convert(args) -> int:
    from bitnet_jax.data.tokenizer import copy_tokenizer, load_tokenizer
    from bitnet_jax.interop.hf import read_hf_config
    from bitnet_jax.model.serving_layers import is_packed, lm_head_kind
    from bitnet_jax.serve.load import load_model
    from bitnet_jax.serve.pack import convert_hf, pack, unpack
    from bitnet_jax.serve.packed_folder import is_packed_folder, save_packed
    from bitnet_jax.train.run_folder import is_run_folder

    if args.format or args.dst.endswith(".gguf") or args.src.endswith(".gguf"):
        return _convert_gguf(args)
    if is_run_folder(args.src) or is_packed_folder(args.src):
        config, params, tokenizer = load_model(args.src)
        if not is_packed(params):
            packed = pack(config, params, lm_head=args.lm_head)
        elif (args.lm_head or lm_head_kind(params)) == lm_head_kind(params):
            packed = params  # a copy of a packed folder
        else:  # another lm_head: from the dequantized rows of this one (the float table is gone)
            packed = pack(config, unpack(config, params), lm_head=args.lm_head)
    else:  # a Hugging Face folder: packed as it is read, so that its float weights never all sit in memory
        config, _ = read_hf_config(args.src)
        tokenizer = load_tokenizer(args.src, bos_id=config.bos_token_id, eos_id=(config.eos_ids or (None,))[0])
        config, packed = convert_hf(args.src, lm_head=args.lm_head)
    save_packed(args.dst, config, packed)
    copy_tokenizer(tokenizer, args.dst)
    # Its stop ids (hf.generation_stop_ids) hold for the packed model too, whatever the tokenizer.
    if os.path.isfile(os.path.join(args.src, "generation_config.json")):
        shutil.copy(os.path.join(args.src, "generation_config.json"), args.dst)
    print(f"Packed {args.src} -> {args.dst} (2-bit ternary layers, lm_head {lm_head_kind(packed)}).")
    return 0


def _convert_gguf(args) -> int:
    """`convert` with a GGUF file on either side: SRC (a run, packed or Hugging Face folder, or a
    GGUF file) -> DST.gguf of --format, or SRC.gguf -> a packed folder DST."""
    from bitnet_jax.data.tokenizer import copy_tokenizer, load_tokenizer
    from bitnet_jax.errors import BitNetError
    from bitnet_jax.interop.gguf import is_gguf_file, load_gguf, load_gguf_tokenizer
    from bitnet_jax.interop.gguf_export import ARCH_OF, FORMATS, save_gguf
    from bitnet_jax.model.serving_layers import lm_head_kind
    from bitnet_jax.serve.chat import chat_template
    from bitnet_jax.serve.load import load_model
    from bitnet_jax.serve.pack import convert_hf
    from bitnet_jax.serve.packed_folder import is_packed_folder, save_packed
    from bitnet_jax.train.run_folder import is_run_folder

    src, dst, fmt, lm_head = args.src, args.dst, args.format, args.lm_head
    if fmt is None and dst.endswith(".gguf"):
        raise BitNetError(f"convert: {dst} is a GGUF file; name its type with --format ({', '.join(FORMATS)}).")
    if fmt is not None:
        if not dst.endswith(".gguf"):
            raise BitNetError(f"convert --format {fmt}: the output {dst!r} should be a file name ending in .gguf.")
        if os.path.isdir(dst):
            raise BitNetError(f"convert: {dst} is a folder; expected the name of the GGUF file to write.")
        if src.endswith(".gguf") or is_gguf_file(src) or is_run_folder(src) or is_packed_folder(src):
            config, params, tokenizer = load_model(src, i2s_layout=args.i2s_layout)
        else:  # a Hugging Face folder, packed a layer at a time (its float weights never all in memory)
            config, params = convert_hf(src, lm_head="float")
            tokenizer = load_tokenizer(src, bos_id=config.bos_token_id, eos_id=(config.eos_ids or (None,))[0])
        save_gguf(
            dst,
            config,
            params,
            tokenizer,
            format=fmt,
            lm_head=lm_head or "f16",
            chat_template=chat_template(src),
            name=os.path.basename(os.path.normpath(src)),
            i2s_layout=args.i2s_layout,
        )
        layout = f", {args.i2s_layout} layout" if fmt == "i2_s" else ""
        print(
            f"Exported {src} -> {dst} ({fmt.upper()} ternary layers{layout}, {lm_head or 'f16'} embedding, "
            f"{ARCH_OF[fmt]})."
        )
        return 0
    config, params = load_gguf(src, lm_head=lm_head, i2s_layout=args.i2s_layout)
    save_packed(dst, config, params)
    copy_tokenizer(load_gguf_tokenizer(src, config), dst)
    print(f"Packed {src} -> {dst} ({config.weight_quant} scales, lm_head {lm_head_kind(params)}).")
    return 0


def _serve(args) -> int:
    from bitnet_jax.serve.compile_cache import enable_compilation_cache
    from bitnet_jax.serve.server import serve

    enable_compilation_cache(args.compilation_cache)

    return serve(
        args.model,
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        max_context=args.max_context,
        max_queue=args.max_queue,
        api_key=args.api_key,
        model_name=args.model_name,
        backend=args.backend,
        kv_cache=args.kv_cache,
        kv_cache_tokens=args.kv_cache_tokens,
        prefill_chunk=args.prefill_chunk,
        prefix_cache=args.prefix_cache,
        shutdown_timeout=args.shutdown_timeout,
    )


def _chat(args) -> int:
    from bitnet_jax.serve.chat import chat_loop
    from bitnet_jax.serve.compile_cache import enable_compilation_cache
    from bitnet_jax.serve.load import load_model

    enable_compilation_cache(args.compilation_cache)

    config, params, tokenizer = load_model(args.model)
    return chat_loop(
        config,
        params,
        tokenizer,
        args.model,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        system=args.system,
        in_child=True,  # the compiler stays out of the chat process (serve/compile_child.py)
    )


def _read_buffer_bytes(args) -> int | None:
    from bitnet_jax.errors import BitNetError

    if args.read_buffer_mb is None:
        return None
    if args.read_buffer_mb < 1:
        raise BitNetError(f"--read-buffer-mb {args.read_buffer_mb}: expected a positive size in MB.")
    return args.read_buffer_mb << 20


def _bench_kernels(args) -> int:
    from bitnet_jax.bench.serve import set_threads

    set_threads(args.threads)  # before JAX starts
    from bitnet_jax.bench.machine import limits_table, measure_limits
    from bitnet_jax.bench.serve import KERNEL_SHAPES, bench_kernels, kernels_table, with_kernel_limits, write_json
    from bitnet_jax.bench.train import cpu_name
    from bitnet_jax.errors import BitNetError

    rows = tuple(int(r) for r in args.rows.split(","))
    isas = args.isa.split(",") if args.isa else None
    shapes = KERNEL_SHAPES
    if args.shapes:
        try:
            shapes = tuple(tuple(int(d) for d in shape.split("x", 1)) for shape in args.shapes.split(","))
        except ValueError:
            raise BitNetError(f"--shapes {args.shapes}: expected comma-separated KxN, e.g. 2560x6912.") from None
        if any(len(shape) != 2 or min(shape) < 1 for shape in shapes):
            raise BitNetError(f"--shapes {args.shapes}: expected comma-separated KxN with K, N >= 1.")
    limits = measure_limits(paths=isas, buffer_bytes=_read_buffer_bytes(args))
    print(limits_table(limits) + "\n", flush=True)
    timings = bench_kernels(rows=rows, shapes=shapes, isas=isas, repeats=args.repeats)
    # Again after the timings, as `bench generate` does: a share is as sure as its two readings agree.
    after = measure_limits(paths=isas, buffer_bytes=_read_buffer_bytes(args))
    results = [with_kernel_limits(r, limits, after) for r in timings]
    print(f"CPU: {cpu_name()}, threads: {results[0].threads}\n")
    print(kernels_table(results))
    if args.json:
        write_json(args.json, results, limits, after)
    return 0


def _bench_generate(args) -> int:
    import multiprocessing

    from bitnet_jax.bench.machine import limits_table
    from bitnet_jax.bench.profile import profile_table
    from bitnet_jax.bench.serve import (
        context_table,
        generate_table,
        limits_tables,
        with_generate_limits,
        write_json,
    )
    from bitnet_jax.bench.train import cpu_name
    from bitnet_jax.errors import BitNetError
    from bitnet_jax.model.config import PRESETS, BitNetConfig
    from bitnet_jax.serve.generate import check_sampling

    if args.preset not in PRESETS:
        raise BitNetError(f"--preset {args.preset!r}: expected one of {sorted(PRESETS)}.")
    if args.threads is not None and args.threads < 1:
        raise BitNetError(f"--threads {args.threads}: expected a positive number of threads.")
    backends = args.backends.split(",")
    if not set(backends) <= {"ffi", "xla", "xla-packed", "pallas"}:
        raise BitNetError(
            f"--backends {args.backends}: expected a comma-separated list of ffi, xla, xla-packed, pallas."
        )
    overrides = {} if args.weight_quant is None else {"weight_quant": args.weight_quant}
    config = BitNetConfig.preset(args.preset, **overrides)  # validates --weight-quant before any child starts
    check_sampling(args.temperature, args.top_k, args.top_p)
    prompt_lengths = _prompt_lengths(args.prompt_tokens)
    new_tokens_most = max(args.new_tokens if backend == "ffi" else args.xla_new_tokens for backend in backends)
    if prompt_lengths[-1] + 1 + new_tokens_most > config.max_position_embeddings:
        raise BitNetError(
            f"--prompt-tokens {args.prompt_tokens}: a {prompt_lengths[-1]}-token prompt and {1 + new_tokens_most} "
            f"generated tokens exceed the {args.preset} context of {config.max_position_embeddings} tokens."
        )
    # One child process per backend: each measures its own peak memory, with a fresh XLA. The
    # machine's limits first, in a child of their own (their read buffer stays out of the peaks).
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        limits = pool.apply(_bench_limits_child, (args.threads, _read_buffer_bytes(args)))
    print(limits_table(limits) + "\n", flush=True)
    results = []
    for backend in backends:
        new_tokens = args.new_tokens if backend == "ffi" else args.xla_new_tokens
        with context.Pool(1) as pool:
            timings = pool.apply(
                _bench_generate_child,
                (
                    args.preset,
                    overrides,
                    backend,
                    args.threads,
                    args.lm_head,
                    prompt_lengths,
                    new_tokens,
                    args.repeats,
                    args.xla_dtype,
                    args.profile,
                    args.kv_cache,
                    args.compilation_cache,
                    dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p),
                ),
            )
        results += timings
        print("\n".join(generate_table(timings).splitlines()[2:]), flush=True)
    # Again after the runs, so that each decode figure stands beside a reading on either side of it.
    with context.Pool(1) as pool:
        limits_after = pool.apply(_bench_limits_child, (args.threads, _read_buffer_bytes(args)))
    print("\nOnce more, after the runs:\n\n" + limits_table(limits_after), flush=True)
    results = [with_generate_limits(r, limits, limits_after) for r in results]
    scales = f", weight_quant={args.weight_quant}" if args.weight_quant else ""
    print(f"\nCPU: {cpu_name()}; random {args.preset}-shaped weights{scales}\n")
    print(generate_table(results))
    print("\n" + limits_tables(results))
    if len(prompt_lengths) > 1:
        print("\n" + context_table(results))
    for r in results:
        if r.profile is not None:
            print("\n" + profile_table(r.profile))
    for r in results:
        if r.compile_s is not None:
            cache = f"compilation cache {r.compilation_cache}" if r.compilation_cache else "no compilation cache"
            print(
                f"\n{r.backend}, {r.prompt_tokens}-token prompt: the generate program compiled in {r.compile_s:.2f} s "
                f"({cache})"
            )
    if args.json:
        write_json(args.json, results, limits, limits_after)
    return 0


def _bench_serve(args) -> int:
    import multiprocessing

    from bitnet_jax.bench.serve import set_threads

    set_threads(args.threads)  # before JAX starts
    from bitnet_jax.bench.machine import limits_table
    from bitnet_jax.bench.serve import write_json
    from bitnet_jax.bench.server import bench_serve, serve_table, with_serve_limits
    from bitnet_jax.bench.train import cpu_name
    from bitnet_jax.errors import BitNetError
    from bitnet_jax.model.config import BitNetConfig

    try:
        clients = tuple(int(c) for c in args.clients.split(","))
    except ValueError:
        raise BitNetError(f"--clients {args.clients}: expected comma-separated counts, e.g. 1,2,4,8.") from None
    # The machine's limits in a child of their own, as for bench generate (its read buffer stays
    # out of the server's peak).
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        limits = pool.apply(_bench_limits_child, (args.threads, _read_buffer_bytes(args)))
    print(limits_table(limits) + "\n", flush=True)
    results = bench_serve(
        BitNetConfig.preset(args.preset),
        clients=clients,
        prompt_tokens=_prompt_range(args.prompt_tokens),
        new_tokens=args.new_tokens,
        max_context=args.max_context,
        lm_head=args.lm_head,
        kv_cache=args.kv_cache,
        kv_cache_tokens=args.kv_cache_tokens,
        prefill_chunk=args.prefill_chunk,
        temperature=args.temperature,
        top_p=args.top_p,
    )
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        limits_after = pool.apply(_bench_limits_child, (args.threads, _read_buffer_bytes(args)))
    print("\nOnce more, after the levels:\n\n" + limits_table(limits_after), flush=True)
    results = [with_serve_limits(r, limits, limits_after) for r in results]
    print(f"\nCPU: {cpu_name()}; random {args.preset}-shaped weights\n")
    print(serve_table(results))
    if args.json:
        write_json(args.json, results, limits, limits_after)
    return 0


def _prompt_lengths(text: str) -> tuple[int, ...]:
    """--prompt-tokens N or N,M,... (bench generate): distinct lengths, in ascending order."""
    from bitnet_jax.errors import BitNetError

    try:
        lengths = tuple(sorted(int(part) for part in text.split(",")))
    except ValueError:
        lengths = ()
    if not lengths or lengths[0] < 1 or len(set(lengths)) != len(lengths):
        raise BitNetError(
            f"--prompt-tokens {text}: expected a length such as 128, or distinct comma-separated lengths "
            "such as 128,2048."
        )
    return lengths


def _prompt_range(text: str) -> int | tuple[int, int]:
    """--prompt-tokens N or A-B (bench serve)."""
    from bitnet_jax.errors import BitNetError

    try:
        bounds = [int(part) for part in text.split("-")]
    except ValueError:
        bounds = []
    if len(bounds) not in (1, 2) or min(bounds) < 1 or bounds != sorted(bounds):
        raise BitNetError(f"--prompt-tokens {text}: expected a length such as 128, or a range such as 20-250.")
    return bounds[0] if len(bounds) == 1 else (bounds[0], bounds[1])


def _bench_limits_child(threads, buffer_bytes):
    from bitnet_jax.bench.serve import set_threads

    set_threads(threads)
    from bitnet_jax.bench.machine import measure_limits
    from bitnet_jax.kernels import ffi

    return measure_limits(paths=[ffi.selected_isa()], buffer_bytes=buffer_bytes)


def _bench_generate_child(
    preset,
    overrides,
    backend,
    threads,
    lm_head,
    prompt_lengths,
    new_tokens,
    repeats,
    xla_dtype,
    profile,
    kv_cache,
    compilation_cache,
    sampling,
):
    from bitnet_jax.bench.serve import set_threads

    set_threads(threads)
    from bitnet_jax.bench.serve import bench_generate_contexts
    from bitnet_jax.model.config import BitNetConfig
    from bitnet_jax.serve.compile_cache import enable_compilation_cache

    enable_compilation_cache(compilation_cache)

    return bench_generate_contexts(
        BitNetConfig.preset(preset, **overrides),
        backend,
        lm_head=lm_head,
        prompt_lengths=prompt_lengths,
        new_tokens=new_tokens,
        repeats=repeats,
        xla_dtype=xla_dtype,
        profile=profile,
        kv_cache=kv_cache,
        **sampling,
    )


def _tokenize(args) -> int:
    import ast
    import dataclasses

    from bitnet_jax.data.documents import tokenize_to_folder, training_documents
    from bitnet_jax.data.sources import parse_source
    from bitnet_jax.data.tokenizer import load_tokenizer
    from bitnet_jax.data.tokenizer_training import train_sentencepiece
    from bitnet_jax.train.run_config import RunConfig

    try:
        spec = ast.literal_eval(args.corpus)
    except (ValueError, SyntaxError):
        spec = args.corpus
    source = parse_source(spec, where="--corpus")
    # Text folders take the run config's default suffixes, as in training.
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    suffixes = defaults["corpus_suffixes"]
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    else:
        docs, _, _ = training_documents(source, suffixes, defaults["heldout_fraction"])
        print(f"Training a {args.vocab_size}-piece sentencepiece tokenizer on {len(docs)} documents...")
        texts = [d for d in docs if isinstance(d, str)]
        files = [d for d in docs if not isinstance(d, str)]
        tokenizer = train_sentencepiece(files, args.vocab_size, args.out, seed=args.seed, texts=texts)
    meta = tokenize_to_folder(source, tokenizer, args.out, suffixes)
    print(
        f"Wrote {meta['documents']} documents, {meta['tokens']} tokens ({meta['dtype']}) of {source.name} to "
        f"{args.out}; train on it with --set corpus=array_record:{args.out}"
    )
    return 0


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value and value.strip().isdigit() else None


def _init_distributed(args):
    """`jax.distributed.initialize` when any multi-process setting is given; it must run before JAX
    touches a device."""
    settings = (args.coordinator_address, args.num_processes, args.process_id)
    if not args.distributed and all(v is None for v in settings):
        return
    import jax

    from bitnet_jax.errors import BitNetError

    try:
        jax.distributed.initialize(*settings)
    except ValueError as e:  # a setting JAX could neither read nor detect
        raise BitNetError(
            f"Multi-process start failed: {e} Expected --coordinator-address HOST:PORT, --num-processes N and "
            f"--process-id I (found {settings[0]!r}, {settings[1]!r}, {settings[2]!r}), or the environment "
            "variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, or a cluster JAX detects "
            "(Slurm, Open MPI, Cloud TPU) with --distributed."
        ) from None


def _train(args) -> int:
    from bitnet_jax.train.loop import train
    from bitnet_jax.train.run_config import load_run_config

    overrides = [*args.set, *([f"init={args.init}"] if args.init else [])]
    # `init` (from --init, --set or the config file) decides what the model settings mean.
    init = load_run_config(args.config, [o for o in overrides if not o.startswith("model.")]).init
    initial_params = None
    if init:  # fine-tuning: architecture, weights and tokenizer come from the model
        from bitnet_jax.serve.load import load_training_model

        config, initial_params, tokenizer = load_training_model(init)
        run = load_run_config(args.config, overrides, init_model=config)
        if not run.tokenizer:
            run = dataclasses.replace(run, tokenizer=str(tokenizer.path))
    else:
        run = load_run_config(args.config, overrides)
    teacher = None
    if run.teacher:  # distillation: the teacher's config and training parameters (train checks its vocabulary)
        from bitnet_jax.serve.load import load_training_model

        teacher_config, teacher_params, _ = load_training_model(run.teacher)
        teacher = (teacher_config, teacher_params)
    _init_distributed(args)
    name = os.path.splitext(os.path.basename(args.config))[0] if args.config else "default"
    out = args.out or os.path.join("runs", name)
    final = train(run, out, progress=not args.no_progress, initial_params=initial_params, teacher=teacher)
    print(
        f"Done: step {final.get('step')}, eval loss {final.get('eval_loss', float('nan')):.3f}. "
        f"Run folder: {out} (metrics.jsonl, loss.png, checkpoints/)."
    )
    return 0


def _generate(args) -> int:
    import numpy as np

    from bitnet_jax.interop.hf import generation_stop_ids
    from bitnet_jax.serve.compile_cache import enable_compilation_cache
    from bitnet_jax.serve.generate import compile_generate, generate
    from bitnet_jax.serve.load import load_model
    from bitnet_jax.serve.packed_folder import is_packed_folder, load_packed
    from bitnet_jax.serve.streaming import StreamDecoder

    enable_compilation_cache(args.compilation_cache)

    # A packed folder: compile from the weights' shapes first, then load them, so that the
    # compiler's working memory is spent before the weights take theirs.
    packed = is_packed_folder(args.model)
    config, params, tokenizer = load_model(args.model, shapes_only=packed)
    prompt_ids = tokenizer.encode(args.prompt)
    if tokenizer.bos_id is not None:
        prompt_ids = [tokenizer.bos_id] + prompt_ids
    stops = generation_stop_ids(args.model, config)
    request = dict(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        stop_ids=stops,
        backend=args.backend,
        kv_cache=args.kv_cache,
    )
    compile_s = None
    if packed:
        start = time.perf_counter()
        # In a child process: this one never holds the compiler's code and memory (~75 MB).
        compile_generate(config, params, [prompt_ids], args.max_new_tokens, streaming=True, in_child=True, **request)
        compile_s = time.perf_counter() - start
        _, params = load_packed(args.model)
    stream = StreamDecoder(tokenizer)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    first_token_at = []

    def on_tokens(tokens_b):
        first_token_at.append(time.perf_counter())
        token = int(np.asarray(tokens_b)[0])
        if token not in stops:
            sys.stdout.write(stream.push(token))
            sys.stdout.flush()

    start = time.perf_counter()
    new_ids = generate(
        config, params, [prompt_ids], args.max_new_tokens, seed=args.seed, on_tokens=on_tokens, **request
    )
    end = time.perf_counter()
    sys.stdout.write(stream.flush() + "\n")
    if args.verbose:
        produced = int(np.sum(~np.isin(new_ids[0], stops))) + 1
        decode_s = end - first_token_at[0] if first_token_at else 0.0
        compiling = "compile included" if compile_s is None else f"compiled in {compile_s:.2f} s before loading"
        print(
            f"[{len(prompt_ids)} prompt tokens, {produced} new; first token after {first_token_at[0] - start:.2f} s "
            f"({compiling}); {max(len(first_token_at) - 1, 0) / max(decode_s, 1e-9):.1f} tokens/s after]",
            file=sys.stderr,
        )
    return 0


def _bench_train(args) -> int:
    import dataclasses
    import json

    from bitnet_jax.bench.train import bench_train, train_table
    from bitnet_jax.train.run_config import load_run_config

    run = load_run_config(args.config, args.set)
    timings = bench_train(run, repeats=args.repeats)
    print(train_table(run, timings))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(t) for t in timings], f, indent=2)
    return 0


def _ablate(args) -> int:
    from bitnet_jax.research.ablate import ablate, load_ablation

    base, grid = load_ablation(args.config, args.set, args.grid, args.steps, args.seeds)
    ablate(base, grid, args.out, seeds=args.seeds, progress=not args.no_progress)
    with open(os.path.join(args.out, "results.md")) as f:
        print(f.read(), end="")
    print(
        f"Ablation folder: {args.out} (results.md, results.json, loss_curves.png, quality_vs_bytes.png, "
        "one run folder per variant and seed)."
    )
    return 0


def _eval(args) -> int:
    from bitnet_jax.research.eval import eval_command, parse_corpus_arg

    eval_command(
        args.model,
        None if args.corpus is None else parse_corpus_arg(args.corpus),
        max_tokens=args.max_tokens,
        context=args.context,
        stride=args.stride,
        batch_size=args.batch_size,
        backend=args.backend,
        json_path=args.json,
    )
    return 0


def _lm_eval(args) -> int:
    from bitnet_jax.research.lm_eval_adapter import run_lm_eval

    return run_lm_eval(args.lm_eval_args)


if __name__ == "__main__":
    sys.exit(main())
