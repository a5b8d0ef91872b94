"""What the quantized lm_head choices cost on a *trained* model (the HF test fixtures are random).

    python benchmarks/lm_head_trade.py RUN_DIR [TEXT_FILE ...]

Loads a `bitnet-jax train` run, packs it with each lm_head kind (float, int8, int4, and for a tied
model int8-tied and int4-tied) and, on
held-out text (default: this repository's README, which no run trains on), reports against the
float head on the same packed layers: relative logit error, next-token argmax agreement, and
how many greedy continuations (32 tokens after each of 16 prompts) are identical.
"""

import sys
from pathlib import Path

import jax
import numpy as np

from bitnet_jax import generate
from bitnet_jax.kernels.ops import ServingSpec
from bitnet_jax.model.serving_layers import serving_variables
from bitnet_jax.model.transformer import BitNetLM
from bitnet_jax.serve.pack import pack
from bitnet_jax.train.run_folder import load_run


def main(run_dir: str, texts: list[str]):
    run, params, tokenizer = load_run(run_dir)
    config = run.model
    ids = np.concatenate([tokenizer.encode(Path(t).read_text()) for t in texts])
    seq = min(256, config.max_position_embeddings)
    windows = ids[: (len(ids) // seq) * seq].reshape(-1, seq)[:16]
    prompts = [list(w[:32]) for w in windows]

    heads = ["int8", "int4"] + (["int8-tied", "int4-tied"] if config.tie_word_embeddings else [])
    logits, greedy = {}, {}
    for head in ("float", *heads):
        packed = pack(config, params, lm_head=head)
        apply = jax.jit(BitNetLM(config, ServingSpec("ffi", head, config.act_bits)).apply)
        logits[head] = np.asarray(apply(serving_variables(packed), windows))
        greedy[head] = generate(config, packed, prompts, 32)
    ref = logits["float"]
    print(
        f"{run_dir}: {config.num_hidden_layers} layers x {config.hidden_size}, vocab {config.vocab_size}, "
        f"tied={config.tie_word_embeddings}; {windows.size} held-out tokens from {', '.join(texts)}\n"
    )
    print("| lm_head | relative logit error | argmax agreement | identical greedy continuations (32 tokens) |")
    print("|---|---:|---:|---:|")
    for head in heads:
        err = np.linalg.norm(logits[head] - ref) / np.linalg.norm(ref)
        agree = np.mean(logits[head].argmax(-1) == ref.argmax(-1))
        same = int(np.sum(np.all(greedy[head] == greedy["float"], axis=1)))
        print(f"| {head} | {err:.2%} | {agree:.1%} | {same} of {len(prompts)} |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or [str(Path(__file__).resolve().parents[1] / "README.md")])
