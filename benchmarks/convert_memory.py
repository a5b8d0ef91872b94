"""Peak memory of `bitnet-jax convert` on random-weight 2B4T-shaped Hugging Face folders.

    python benchmarks/convert_memory.py [--variants online,offline] [--keep DIR]

Writes a folder shaped like microsoft/bitnet-b1.58-2B-4T (hidden 2560, intermediate 6912, 30
layers, 20 heads / 5 kv heads, vocab 128256, tied embeddings, relu2) in each layout asked for:

- online: bf16 master weights (`autobitlinear`, `quantization_mode: online`), 4.8 GB;
- offline: the released checkpoint's layout (`bitlinear`, offline): BitLinear weights as uint8
  [out/4, in] (byte [r, c] holds rows r, r+R, r+2R, r+3R, R = out/4, as codes t + 1 from the low
  bits up) with a bf16 `weight_scale` = 1/mean|W|; embedding and norms in bf16. 1.2 GB.

Each folder also gets a word-level tokenizer.json with the model's 128256 ids (convert copies a
tokenizer and checks the config's bos / eos ids against it; what it holds changes nothing here).
Then `bitnet-jax convert` runs on it in a child process, with the default lm_head (int8-tied), and
the child's peak resident memory (its `ru_maxrss`, from wait4) is printed beside the size of the
packed model.safetensors, in MB of 10^6 bytes. The folders go to a temporary directory that is
deleted afterwards (`--keep DIR` writes them there and reuses them; check its free space first).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

VOCAB, HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 128256, 2560, 6912, 30, 20, 5
HEAD_DIM = HIDDEN // HEADS
LINEARS_OUT_IN = {  # [out, in] of each BitLinear, as transformers stores it
    "self_attn.q_proj": (HEADS * HEAD_DIM, HIDDEN),
    "self_attn.k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
    "self_attn.v_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HEADS * HEAD_DIM),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
    "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}
NORM_WIDTHS = {
    "input_layernorm": HIDDEN,
    "post_attention_layernorm": HIDDEN,
    "self_attn.attn_sub_norm": HEADS * HEAD_DIM,
    "mlp.ffn_sub_norm": INTERMEDIATE,
}
QUANTIZATION = {
    "online": {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"},
    "offline": {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline"},
}
# Bytes of each folder's weights, and of the packed output (one at a time), for the disk check.
FOLDER_BYTES = {"online": 4.83e9, "offline": 1.18e9}
PACKED_BYTES = 0.86e9
# Every byte whose four 2-bit fields are ternary codes (0, 1, 2): random packed weights.
TERNARY_BYTES = np.array(
    [a | b << 2 | c << 4 | d << 6 for a in range(3) for b in range(3) for c in range(3) for d in range(3)], np.uint8
)


def config_json(variant: str) -> dict:
    """microsoft/bitnet-b1.58-2B-4T's config.json (minus auto_map), with the variant's quantization."""
    return {
        "architectures": ["BitNetForCausalLM"],
        "model_type": "bitnet",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "hidden_act": "relu2",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": 4096,
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": VOCAB,
        "quantization_config": QUANTIZATION[variant],
    }


def random_tensors(variant: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    def bf16(*shape, std=1.0, mean=0.0):
        return (rng.standard_normal(shape, np.float32) * std + mean).astype(ml_dtypes.bfloat16)

    tensors = {"model.embed_tokens.weight": bf16(VOCAB, HIDDEN), "model.norm.weight": bf16(HIDDEN, std=0.1, mean=1)}
    for i in range(LAYERS):
        for norm, width in NORM_WIDTHS.items():
            tensors[f"model.layers.{i}.{norm}.weight"] = bf16(width, std=0.1, mean=1)
        for name, (out_features, in_features) in LINEARS_OUT_IN.items():
            prefix = f"model.layers.{i}.{name}"
            if variant == "online":
                tensors[f"{prefix}.weight"] = bf16(out_features, in_features, std=0.02)
            else:
                tensors[f"{prefix}.weight"] = rng.choice(TERNARY_BYTES, (out_features // 4, in_features))
                tensors[f"{prefix}.weight_scale"] = np.array([50.0], ml_dtypes.bfloat16)  # 1 / mean|W|
    return tensors


def write_folder(folder: Path, variant: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        random_tensors(variant, np.random.default_rng(0)), folder / "model.safetensors", metadata={"format": "pt"}
    )
    (folder / "config.json").write_text(json.dumps(config_json(variant), indent=2))
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))


def run_measured(command: list[str]) -> tuple[int, float, float]:
    """(exit status, peak resident bytes, seconds) of `command` run as a child process."""
    start = time.perf_counter()
    child = subprocess.Popen(command)
    _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, not all children's
    child.returncode = os.waitstatus_to_exitcode(status)
    return child.returncode, usage.ru_maxrss * 1024, time.perf_counter() - start  # ru_maxrss: KiB on Linux


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="online,offline", help="comma-separated: online, offline")
    parser.add_argument("--keep", help="write the folders here (and reuse them if they are there)")
    args = parser.parse_args()
    variants = args.variants.split(",")
    convert = [sys.executable, "-m", "bitnet_jax.cli", "convert"]
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)

    with tempfile.TemporaryDirectory(dir=args.keep) as tmp:
        base = Path(args.keep or tmp)
        needed = PACKED_BYTES + sum(FOLDER_BYTES[v] for v in variants if not (base / v / "model.safetensors").is_file())
        free = shutil.disk_usage(base).free
        if free < needed + 2e9:
            sys.exit(
                f"{base}: {free / 1e9:.1f} GB free; these folders need about {needed / 1e9:.1f} GB "
                "(plus 2 GB to spare). Free some space or point --keep elsewhere."
            )
        rows = []
        for variant in variants:
            folder = base / variant
            if not (folder / "model.safetensors").is_file():
                print(f"writing {folder} ...", flush=True)
                write_folder(folder, variant)
            out = Path(tmp) / f"{variant}-packed"
            status, peak, seconds = run_measured(convert + [str(folder), str(out)])
            if status:
                sys.exit(f"bitnet-jax convert failed on {folder} (exit status {status})")
            packed = (out / "model.safetensors").stat().st_size
            source = (folder / "model.safetensors").stat().st_size
            rows.append(
                f"| {variant} | {source / 1e6:.0f} | {packed / 1e6:.0f} | {peak / 1e6:.0f} | "
                f"{(peak - packed) / 1e6:.0f} | {seconds:.0f} |"
            )
            shutil.rmtree(out)
    print(
        "| variant | source weights, MB | packed model.safetensors, MB | convert peak RSS, MB "
        "| peak - packed, MB | seconds |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
