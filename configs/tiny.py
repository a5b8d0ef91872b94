"""The quickstart run: a tiny BitNet b1.58 trained from scratch on the Python standard library.

Sized for a 2-core CPU: about 4.5 minutes of training (~1M tokens at ~3,700 tokens/s), after which
the held-out loss has fallen from ln(4096) = 8.37 to under 60% of that. Measured on a 2-core
Xeon: batches of 16 x 128 tokens train ~45% faster per token than 16 x 256 here, and at this
scale the loss after N tokens hardly depends on the learning rate (3e-3 to 8e-3) or on a
2048-piece vocabulary, so the token count is what matters. `--set steps=50` (or any other
field) overrides.
"""


def get_config():
    return {
        "model": {"preset": "tiny"},  # 4 layers, width 256, vocab 4096 (see bitnet_jax/model/config.py)
        "corpus": "stdlib",
        "seq_len": 128,
        "batch_size": 16,
        "steps": 480,
        "warmup_steps": 30,
        "learning_rate": 8e-3,
        "stage2_learning_rate": 3e-3,  # BitNet b1.58's drop at stage2_start (half of the steps)
        "min_learning_rate": 3e-4,
        "weight_decay": 0.1,  # 0 in stage two
        "eval_every": 120,
        "eval_batches": 8,
        "checkpoint_every": 120,
        # The 4 layers unrolled, not scanned: 15% faster steps on CPU for about 2 s more of compiling
        # (benchmarks/RESULTS.md, "Training throughput"); the same parameters either way.
        "scan_layers": False,
    }
