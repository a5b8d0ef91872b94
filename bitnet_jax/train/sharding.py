"""Sharding a training run over a device mesh: logical axis names -> mesh axes, in one table.

The mesh has three axes, sized by `RunConfig.mesh = (data, fsdp, tensor)`:
  data    data parallelism: the batch is split; parameters and optimizer state are replicated
  fsdp    fully sharded data parallelism: the batch is split, and so are parameters and
          optimizer state (along their `embed` axis), gathered by XLA where a layer needs them
  tensor  tensor parallelism: attention heads, FFN width and the vocabulary are split

`model.py` names the axes of parameters (`embed`, `mlp`, `q_heads`, `kv_heads`, `vocab`,
`layers`) and of activations at layer boundaries (`batch`, `length`, `act_embed`); `RULES` maps
those names onto mesh axes. Norm weights carry no names and are replicated (a few KB per layer).

The train step is one `jax.jit` over global arrays with explicit in/out shardings, so every
reduction in it (BitLinear's absmean over a sharded kernel, the loss mean, the gradient norm) is
over the whole array, as on one device; only the order of float sums differs.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bitnet_jax.errors import BitNetError
from bitnet_jax.model.transformer import BitNetLM

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the mesh axes a global batch is split over

RULES = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),  # scanned layers run one after another: every device needs every layer
    ("length", None),
    ("act_embed", None),  # whole rows of D on every tensor shard (Megatron-style blocks)
)


def resolve_mesh_shape(shape, num_devices: int) -> tuple[int, int, int]:
    """`(data, fsdp, tensor)` with a -1 wildcard replaced by the devices left over."""
    shape = tuple(shape)
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise BitNetError(
                f"mesh={shape} cannot use all {num_devices} devices: the fixed axes use {known}, which does not "
                f"divide {num_devices}. Set mesh so that (data, fsdp, tensor) multiply to {num_devices}."
            )
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise BitNetError(
            f"mesh={shape} (data, fsdp, tensor) needs {math.prod(shape)} devices; found {num_devices}. "
            f"Set mesh so that its axes multiply to {num_devices}, e.g. --set mesh=({num_devices},1,1), or use -1 "
            "for one axis to take all remaining devices."
        )
    return shape


def make_mesh(shape, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes).

    Axis types are Auto: shardings are given at the jit boundary and by constraints, and XLA
    propagates them through the rest of the step (`jax.make_mesh` defaults to Explicit).
    """
    devices = jax.devices() if devices is None else list(devices)
    shape = resolve_mesh_shape(shape, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def check_batch(batch_size: int, grad_accum_steps: int, mesh: Mesh):
    """Each micro-batch must split evenly over the batch axes of the mesh."""
    split = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if batch_size % (grad_accum_steps * split):
        micro = f" in each of grad_accum_steps={grad_accum_steps} micro-batches" if grad_accum_steps > 1 else ""
        raise BitNetError(
            f"batch_size={batch_size} cannot be split evenly over data x fsdp = {split} devices{micro}: expected a "
            f"multiple of {grad_accum_steps * split}. Change batch_size, grad_accum_steps or the mesh."
        )


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None):
    """Makes the model's `nn.with_logical_constraint` calls effective while a step is traced."""
    if mesh is None:
        yield
        return
    with nn.logical_axis_rules(RULES), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        yield


def _abstract_variables(model: BitNetLM) -> dict:
    """The model's variables as shapes, still boxed with their logical axis names."""
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))


def param_specs(model: BitNetLM) -> dict:
    """The parameters' logical PartitionSpecs, e.g. P('layers', 'embed', 'mlp'); P() for norms."""
    return nn.get_partition_spec(_abstract_variables(model))["params"]


def param_shardings(model: BitNetLM, mesh: Mesh) -> dict:
    """NamedShardings of the (unboxed) parameter tree on `mesh`; refuses uneven splits."""
    variables = _abstract_variables(model)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(variables)["params"], mesh, RULES)
    flat_shapes = jax.tree_util.tree_flatten_with_path(nn.unbox(variables)["params"])[0]
    for (path, shape), sharding in zip(flat_shapes, jax.tree.leaves(shardings)):
        for dim, axes in zip(shape.shape, sharding.spec):
            axes = (axes,) if isinstance(axes, str) else (axes or ())
            ways = math.prod(mesh.shape[a] for a in axes)
            if dim % ways:
                name = "/".join(k.key for k in path)
                axes = " x ".join(axes)
                raise BitNetError(
                    f"Parameter {name} {tuple(shape.shape)} cannot be split {ways} ways over mesh axis {axes}: "
                    f"its size {dim} is not a multiple of {ways}. Choose a mesh whose {axes} size divides {dim}, "
                    "or change the model size."
                )
    return shardings


class TrainShardings(NamedTuple):
    """Where everything a train step touches lives on the mesh."""

    mesh: Mesh
    params: dict
    opt_state: object
    batch: NamedSharding  # [B, ...] arrays, B split over data x fsdp
    replicated: NamedSharding  # scalars (the loss)


def train_shardings(model: BitNetLM, optimizer: optax.GradientTransformation, mesh: Mesh) -> TrainShardings:
    params = param_shardings(model, mesh)
    replicated = NamedSharding(mesh, P())
    # Optimizer moments mirror the parameters and are sharded like them; counters and
    # hyperparameters are scalars, replicated.
    abstract_state = jax.eval_shape(optimizer.init, nn.unbox(_abstract_variables(model))["params"])
    is_sharding = lambda x: isinstance(x, NamedSharding)
    opt_state = optax.tree_map_params(
        optimizer,
        lambda _, s: s,
        abstract_state,
        params,
        transform_non_params=lambda _: replicated,
        is_leaf=is_sharding,
    )
    return TrainShardings(mesh, params, opt_state, NamedSharding(mesh, P(BATCH_AXES)), replicated)


def init_sharded(model: BitNetLM, seed: int, shardings: dict) -> dict:
    """The parameters of `init_params(config, seed)`, created directly in their shards (no
    device ever holds the whole model). Same values: JAX's random bits do not depend on sharding
    (`jax_threefry_partitionable`, on by default)."""
    init = lambda: nn.unbox(model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 1), jnp.int32)))["params"]
    return jax.jit(init, out_shardings=shardings)()


def global_batch(batch: dict, sharding: NamedSharding) -> dict:
    """A global batch (numpy, identical on every process) as jax.Arrays split over the mesh.

    Each process passes only the rows its own devices hold; on one process that is all of them.
    """

    def put(x):
        x = np.asarray(x)
        rows = _process_rows(sharding, x.shape)
        return jax.make_array_from_process_local_data(sharding, x[rows], x.shape)

    return {k: put(v) for k, v in batch.items()}


def _process_rows(sharding: NamedSharding, shape) -> slice:
    """The contiguous block of batch rows held by this process's devices."""
    starts, stops = [], []
    for index in sharding.addressable_devices_indices_map(shape).values():
        starts.append(index[0].start or 0)
        stops.append(shape[0] if index[0].stop is None else index[0].stop)
    rows = slice(min(starts), max(stops))
    held = sum(stop - start for start, stop in {(a, b) for a, b in zip(starts, stops)})
    if held != rows.stop - rows.start:  # not with make_mesh, which keeps each process's devices together
        raise RuntimeError(
            f"This process's devices hold batch rows {sorted(set(zip(starts, stops)))}, not one "
            "block: order the mesh devices by process."
        )
    return rows
