"""What a decoded token must read and what a prompt token must compute, counted from the arrays.

Decode reads every decoder-layer weight and the lm_head once per token, plus the KV cache up to
the current position; its limit is read bandwidth / those bytes (the roofline). Prefill
multiplies each prompt token by every ternary matrix: 2 * K * N int8 operations per matrix and
token (a multiply and an add per weight), against the int8 multiply-add peak. The bytes come from
the parameter arrays and the cache's shape (never from a formula of the config), so that they
count what the model really holds: packed codes and scales, or dense kernels on the XLA path.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# Leaves of the decoder layers that hold matmul weights (packed, or dense on the XLA path).
_LAYER_WEIGHTS = ("w_packed", "w_scale", "kernel")


@dataclasses.dataclass(frozen=True)
class DecodeBytes:
    """Bytes read per decoded token, by part."""

    layers: int  # the decoder layers' matmul weights (packed ternary codes and scales, or kernels)
    head: int  # the lm_head table (the embedding table when tied)
    other: int  # norm weights, and the one embedding row looked up (an untied embedding)
    kv_per_slot: int  # keys and values of one cache position, all layers

    def per_token(self, context: float) -> float:
        """Bytes read by a token that attends over `context` cache positions."""
        return self.layers + self.head + self.other + self.kv_per_slot * context


def _nbytes(leaf) -> int:
    return math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize


def decode_bytes(config, params, cache_dtype) -> DecodeBytes:
    """Counts what one decode step reads, from `params` (packed or dense, arrays or
    `jax.ShapeDtypeStruct`s) and the shape of one KV-cache position of `cache_dtype`."""
    import jax
    from flax.traverse_util import flatten_dict

    from bitnet_jax.model.transformer import KVCache

    head_table = "lm_head" if "lm_head" in params else "embed_tokens"
    layers = head = other = 0
    for path, leaf in flatten_dict(params).items():
        if path[0] == "layers" and path[-1] in _LAYER_WEIGHTS:
            layers += _nbytes(leaf)
        elif path[0] == head_table:
            head += _nbytes(leaf)
        elif path[0] == "embed_tokens":  # a table apart from the head: one row per token
            other += _nbytes(leaf) // leaf.shape[0]
        else:
            other += _nbytes(leaf)
    slot = jax.eval_shape(lambda: KVCache.zeros(config, 1, 1, dtype=cache_dtype))
    return DecodeBytes(layers, head, other, sum(_nbytes(x) for x in jax.tree.leaves(slot)))


def decode_context(prompt_tokens: int, new_tokens: int) -> float:
    """Mean cache positions attended over by the timed decode steps: step i (1..new_tokens)
    feeds the token at position prompt_tokens + i - 1, which attends over prompt_tokens + i."""
    return prompt_tokens + (new_tokens + 1) / 2


def ternary_ops_per_token(config) -> int:
    """int8 operations of the ternary matmuls for one token: 2 * K * N per BitLinear, all layers."""
    per_layer = sum(k * n for block in config.linear_shapes.values() for k, n in block.values())
    return 2 * per_layer * config.num_hidden_layers


def matmul_ops(m: int, k: int, n: int) -> int:
    """Operations of an [M, K] x [K, N] product: one multiply and one add per term."""
    return 2 * m * k * n
