"""Memory per device for fine-tuning b1.58 2B4T (or any preset) on a mesh, computed from the shardings.

    XLA_FLAGS=--xla_force_host_platform_device_count=16 python benchmarks/finetune_memory.py \\
        [--preset b1.58-2b4t] [--fsdp 1 2 4 8 16] [--seq-len 4096] [--batch-per-device 1] [--compile]

For each mesh (data=1, fsdp=F, tensor=1) it builds the run's real train shardings
(`train.sharding.train_shardings`, the table `bitnet-jax train` uses) over abstract parameters and
AdamW state (`jax.eval_shape`: nothing is allocated) and sums, per device, the bytes of its shard
of the f32 master weights, of the gradients (same shardings) and of the optimizer state. With
`--compile`, it also lowers and compiles the bf16 train step for those shardings on simulated CPU
devices and prints XLA's memory analysis (arguments, outputs, temporaries: activations and
gathered weights included). Prints a markdown table.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax.model.config import BitNetConfig
from bitnet_jax.model.transformer import init_params
from bitnet_jax.train import sharding
from bitnet_jax.train.run_config import RunConfig
from bitnet_jax.train.run_folder import abstract_like
from bitnet_jax.train.step import make_model, make_optimizer, make_train_step


def shard_bytes(abstract_tree, shardings_tree) -> int:
    """Bytes of one device's shard of every leaf (the largest shard where they differ)."""
    total = 0
    for leaf, spec in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings_tree)):
        shape = spec.shard_shape(leaf.shape)
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="b1.58-2b4t")
    parser.add_argument("--fsdp", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch-per-device", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="also XLA's memory analysis of the compiled step")
    args = parser.parse_args()

    config = BitNetConfig.preset(args.preset)
    rows = []
    for fsdp in args.fsdp:
        if fsdp > jax.device_count():
            print(f"skipping fsdp={fsdp}: only {jax.device_count()} devices (set XLA_FLAGS)")
            continue
        run = RunConfig(
            model=config,
            mesh=(1, fsdp, 1),
            batch_size=args.batch_per_device * fsdp,
            seq_len=args.seq_len,
            compute_dtype="bfloat16",
            remat="full",
        )
        mesh = sharding.make_mesh(run.mesh, jax.devices()[:fsdp])
        model, optimizer = make_model(run), make_optimizer(run)
        shardings = sharding.train_shardings(model, optimizer, mesh)
        params = jax.eval_shape(lambda: init_params(config))
        opt_state = jax.eval_shape(optimizer.init, params)
        weights = shard_bytes(params, shardings.params)
        moments = shard_bytes(opt_state, shardings.opt_state)
        row = {"fsdp": fsdp, "weights": weights, "grads": weights, "optimizer": moments}
        if args.compile:
            step = make_train_step(model, optimizer, compute_dtype=jnp.bfloat16, shardings=shardings, donate=True)
            batch = {
                name: jax.ShapeDtypeStruct((run.batch_size, run.seq_len), jnp.int32, sharding=shardings.batch)
                for name in ("inputs", "targets", "segment_ids")
            }
            compiled = step.lower(
                abstract_like(params, shardings.params), abstract_like(opt_state, shardings.opt_state), batch
            ).compile()
            memory = compiled.memory_analysis()
            row["compiled_temp"] = memory.temp_size_in_bytes
            row["compiled_args"] = memory.argument_size_in_bytes
        rows.append(row)

    gb = lambda n: f"{n / 1e9:.2f}"
    extra = " | XLA temporaries (GB) | XLA arguments (GB)" if args.compile else ""
    print(f"{args.preset}: {config.num_params / 1e9:.2f} B parameters, f32 master weights, AdamW (2 moments), ")
    print(f"bf16 compute, full remat, {args.batch_per_device} x {args.seq_len} tokens per device\n")
    print(f"| fsdp devices | weights (GB) | gradients (GB) | AdamW state (GB) | sum (GB){extra} |")
    print("|---:|---:|---:|---:|---:|" + ("---:|---:|" if args.compile else ""))
    for r in rows:
        total = r["weights"] + r["grads"] + r["optimizer"]
        cells = [str(r["fsdp"]), gb(r["weights"]), gb(r["grads"]), gb(r["optimizer"]), gb(total)]
        if args.compile:
            cells += [gb(r["compiled_temp"]), gb(r["compiled_args"])]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
