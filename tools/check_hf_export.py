"""Check by hand that transformers runs a folder written by `bitnet-jax export-hf` as bitnet-jax does.

Two steps, in two environments (bitnet-jax's, and one with torch + transformers, e.g.
`pip install torch==2.13.0 transformers accelerate safetensors`):

    python tools/check_hf_export.py write DIR      # bitnet-jax: DIR/bitnet_jax_expected.npz
    TORCH_COMPILE_DISABLE=1 python tools/check_hf_export.py check DIR   # transformers: compare

`write` runs bitnet-jax's fp32 forward (`load_hf`, the reader tests/test_hf_parity.py checks against
transformers) on fixed token ids; `check` loads DIR with `BitNetForCausalLM.from_pretrained` in
fp32 (eager attention), runs the same ids and prints the relative logit error, argmax agreement
and the greedy continuation of both. Two correct fp32 implementations differ where a per-token
int8 activation code rounds the other way (../shared/NOTES.md): expect a relative error of a few
1e-3 and near-complete argmax agreement, not bit equality. Never run in CI (no torch there).
"""

from __future__ import annotations

import os
import sys

import numpy as np

EXPECTED = "bitnet_jax_expected.npz"


def write(folder: str) -> None:
    import jax

    from bitnet_jax import BitNetLM, generate, load_hf

    config, params = load_hf(folder)
    ids = np.random.default_rng(0).integers(3, config.vocab_size, (2, 16)).astype(np.int32)
    logits = np.asarray(jax.jit(BitNetLM(config).apply)({"params": params}, ids))
    greedy = generate(config, params, ids[:1, :8], 12, backend="xla")
    np.savez(os.path.join(folder, EXPECTED), input_ids=ids, logits=logits, greedy_prompt=ids[:1, :8], greedy=greedy)
    print(f"wrote {folder}/{EXPECTED}: logits {logits.shape}, greedy {greedy[0].tolist()}")


def check(folder: str) -> None:
    if os.environ.get("TORCH_COMPILE_DISABLE") != "1":
        sys.exit("set TORCH_COMPILE_DISABLE=1 (transformers' BitNet quantizers are torch.compile'd)")
    import torch
    from transformers import BitNetForCausalLM

    expected = np.load(os.path.join(folder, EXPECTED))
    model = BitNetForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    model = torch.nn.Module.float(model).eval()  # bf16 embeddings / norms upcast for an fp32 reference
    with torch.no_grad():
        logits = model(torch.as_tensor(expected["input_ids"], dtype=torch.long)).logits.numpy()
        greedy = model.generate(
            torch.as_tensor(expected["greedy_prompt"], dtype=torch.long),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[:, expected["greedy_prompt"].shape[1] :].numpy()
    want = expected["logits"]
    rel = np.linalg.norm(logits - want) / np.linalg.norm(want)
    agree = np.mean(logits.argmax(-1) == want.argmax(-1))
    print(f"{folder}: {type(model.model.layers[0].mlp.up_proj).__name__} layers")
    print(f"relative logit error vs bitnet-jax: {rel:.2e}; argmax agreement {agree:.1%}")
    print(f"greedy transformers: {greedy[0].tolist()}")
    print(f"greedy bitnet-jax:   {expected['greedy'][0].tolist()}")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("write", "check"):
        sys.exit(__doc__)
    (write if sys.argv[1] == "write" else check)(sys.argv[2])
