"""`BitNetConfig`: the architecture and quantization of a BitNet b1.58 model, declared once.

The field names follow Hugging Face's `BitNetConfig` where one exists, so that a `config.json`
maps onto this class key for key (`bitnet_jax.interop.hf.config_from_hf` / `config_to_hf`). The
quantization fields are ours: they make the granularity of the quantizers a config switch for
research ablations.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from bitnet_jax.errors import BitNetError, did_you_mean

WEIGHT_QUANT_HELP = "'tensor' (absmean per tensor), 'channel' (per output channel), 'group:G' or 'none'"
ACT_QUANT_HELP = "'token' (absmax per token), 'tensor' or 'none'"
ACTIVATIONS = ("relu2", "silu")
# Policies of `jax.checkpoint_policies` that take no arguments and can be named in a run config's
# `remat` (beside 'none' and 'full'); `transformer.remat_policy` applies them.
REMAT_POLICIES = (
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "checkpoint_dots",
    "checkpoint_dots_with_no_batch_dims",
    "nothing_saveable",
    "everything_saveable",
)


@dataclasses.dataclass(frozen=True)
class BitNetConfig:
    """A LLaMA-like decoder whose linear layers are BitLinear (ternary weights, low-bit activations).

    Quantization (ours, not in Hugging Face's config):
      weight_quant: 'tensor' (the b1.58 recipe: one absmean scale per weight matrix), 'channel'
        (one per output channel), 'group:G' (one per output channel and run of G input features),
        or 'none' (full-precision weights).
      act_quant: 'token' (the b1.58 recipe: absmax per token), 'tensor' (one absmax over the whole
        activation tensor, batch included), or 'none'.
      act_bits: bits of the activation quantizer (8 in b1.58; 4 for BitNet a4.8-style ablations).
      linear_norm_eps: if set, an RMSNorm with this epsilon inside every BitLinear before
        activation quantization (Hugging Face's `quantization_config.use_rms_norm`); b1.58 2B4T
        does not use one.
      hadamard: BitNet v2's online Hadamard transform (arXiv 2504.18415) on the inputs of o_proj
        and down_proj, before their activation quantizer, so that low-bit (4-bit) activations
        keep their outliers in check (`model/hadamard.py`). 0: off (b1.58). A power of two n: a
        block-diagonal Walsh-Hadamard rotation of n-wide blocks, n dividing both input widths
        (num_attention_heads * head_dim and intermediate_size). -1: per projection, the largest
        power of two that divides its input width (the whole width when it is a power of two,
        as in the paper). The two projections' weights are trained in the rotated basis.
      hadamard_seed: None (the plain Walsh-Hadamard rotation) or a seed of random sign flips
        before it, `x -> x D H` with D a fixed +-1 diagonal (the randomized Hadamard transform of
        QuaRot / SpinQuant, which spreads even inputs that line up with a Walsh function). The
        signs are derived from (seed, input width) alone, so the config reproduces them
        (`model/hadamard.py`). Inert while hadamard is 0.
    """

    vocab_size: int = 128256
    hidden_size: int = 2560
    intermediate_size: int = 6912
    num_hidden_layers: int = 30
    num_attention_heads: int = 20
    num_key_value_heads: int = 5
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    hidden_act: str = "relu2"
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 128000
    eos_token_id: int | tuple[int, ...] | None = 128001
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    weight_quant: str = "tensor"
    act_quant: str = "token"
    act_bits: int = 8
    linear_norm_eps: float | None = None
    hadamard: int = 0
    hadamard_seed: int | None = None

    def __post_init__(self):
        _check_types(self)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                _bad(
                    "hidden_size",
                    self.hidden_size,
                    f"a multiple of num_attention_heads={self.num_attention_heads} (or set head_dim)",
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            if getattr(self, name) < 1:
                _bad(name, getattr(self, name), "a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            _bad(
                "num_key_value_heads",
                self.num_key_value_heads,
                f"a divisor of num_attention_heads={self.num_attention_heads}",
            )
        if self.head_dim % 2:
            _bad("head_dim", self.head_dim, "an even number (RoPE rotates pairs of features)")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            _bad("rope_theta", self.rope_theta, "a positive number")
        if not self.rms_norm_eps > 0:
            _bad("rms_norm_eps", self.rms_norm_eps, "a positive number")
        if self.linear_norm_eps is not None and not self.linear_norm_eps > 0:
            _bad("linear_norm_eps", self.linear_norm_eps, "a positive number or None")
        if self.hidden_act not in ACTIVATIONS:
            _bad("hidden_act", self.hidden_act, f"one of {ACTIVATIONS}")
        for name in ("bos_token_id", "pad_token_id"):
            token = getattr(self, name)
            if token is not None and not 0 <= token < self.vocab_size:
                _bad(name, token, f"an id in [0, vocab_size={self.vocab_size}) or None")
        for token in self.eos_ids:
            if not 0 <= token < self.vocab_size:
                _bad("eos_token_id", self.eos_token_id, f"ids in [0, vocab_size={self.vocab_size}) or None")
        group = self.weight_group_size  # parses and validates weight_quant
        if group:
            widths = {
                "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size,
                "num_attention_heads*head_dim": self.num_attention_heads * self.head_dim,
            }
            for name, width in widths.items():
                if width % group:
                    _bad(
                        "weight_quant",
                        self.weight_quant,
                        f"a group size that divides every BitLinear input width ({name}={width})",
                    )
        if self.act_quant not in ("token", "tensor", "none"):
            _bad("act_quant", self.act_quant, ACT_QUANT_HELP)
        if not 2 <= self.act_bits <= 8:
            _bad("act_bits", self.act_bits, "an integer from 2 to 8")
        widths = self.hadamard_widths
        common = min(width & -width for width in widths.values())  # the largest power of two dividing all
        for name, width in widths.items():
            hadamard_block(self.hadamard, width, f"{name}={width}", f"{common} is the largest dividing both")
        if self.hadamard_seed is not None and self.hadamard_seed < 0:
            _bad(
                "hadamard_seed",
                self.hadamard_seed,
                "None (no sign flips) or a non-negative integer that seeds the signs of the Hadamard rotation",
            )

    # Derived values.
    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    @property
    def weight_group_size(self) -> int:
        """G for 'group:G', else 0."""
        if self.weight_quant in ("tensor", "channel", "none"):
            return 0
        kind, _, size = self.weight_quant.partition(":")
        if kind != "group" or not size.isdigit() or int(size) < 1:
            _bad("weight_quant", self.weight_quant, WEIGHT_QUANT_HELP)
        return int(size)

    @property
    def hadamard_widths(self) -> dict[str, int]:
        """The input widths of the projections `hadamard` rotates (o_proj, down_proj), by the
        config fields that make them."""
        return {
            "num_attention_heads*head_dim": self.num_attention_heads * self.head_dim,
            "intermediate_size": self.intermediate_size,
        }

    @property
    def linear_shapes(self) -> dict[str, dict[str, tuple[int, int]]]:
        """(in, out) features of every BitLinear of a decoder layer, by block and name: the one list
        of the linear layers that loaders, packing and benchmarks walk."""
        d, f = self.hidden_size, self.intermediate_size
        heads, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        return {
            "self_attn": {"q_proj": (d, heads), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (heads, d)},
            "mlp": {"gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)},
        }

    @property
    def num_params(self) -> int:
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        qo = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        layer = d * (qo + 2 * kv) + qo * d + 3 * d * f + 2 * d + qo + f
        return self.num_hidden_layers * layer + v * d * (1 if self.tie_word_embeddings else 2) + d

    # Construction.
    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> "BitNetConfig":
        """Builds a config from a dict, refusing unknown keys by name."""
        check_known_keys(values, {f.name for f in dataclasses.fields(cls)}, source)
        return cls(**values)

    @classmethod
    def preset(cls, name: str, **overrides) -> "BitNetConfig":
        if name not in PRESETS:
            raise BitNetError(f"Unknown preset {name!r}: expected one of {sorted(PRESETS)}.")
        return cls.from_dict({**PRESETS[name], **overrides}, source=f"preset {name!r} overrides")

    def replace(self, **changes) -> "BitNetConfig":
        return self.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        if isinstance(values["eos_token_id"], tuple):
            values["eos_token_id"] = list(values["eos_token_id"])
        return values


PRESETS: dict[str, dict[str, Any]] = {
    # BitNet b1.58 2B4T (microsoft/bitnet-b1.58-2B-4T).
    "b1.58-2b4t": dict(
        vocab_size=128256,
        hidden_size=2560,
        intermediate_size=6912,
        num_hidden_layers=30,
        num_attention_heads=20,
        num_key_value_heads=5,
        max_position_embeddings=4096,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    # The 700M size of the b1.58 paper's reproduction (LLaMA tokenizer + pad token, vocab 32002).
    "b1.58-700m": dict(
        vocab_size=32002,
        hidden_size=1536,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    ),
    # Small enough to train in minutes on two CPU cores; used by the quickstart and the tests.
    "tiny": dict(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ),
}


HADAMARD_HELP = (
    "0 (off), -1 (per projection, the largest power of two dividing its input width) or a power of "
    "two n >= 2 that divides num_attention_heads*head_dim and intermediate_size"
)


def hadamard_block(setting: int, width: int, what: str = "", hint: str = "") -> int:
    """The block size of the Hadamard rotation of an input `width` wide for a `hadamard` setting
    (see `BitNetConfig`): 0 when off. Refuses a setting this width cannot take; `what` names the
    width in the message, `hint` suggests a value."""
    if setting == 0:
        return 0
    what = what or f"width {width}"
    if setting == -1:
        block = width & -width  # the lowest set bit: the largest power of two dividing width
        if block < 2:
            _bad("hadamard", setting, f"{HADAMARD_HELP}; {what} is odd, so no block of 2 or more divides it")
        return block
    if setting < 2 or setting & (setting - 1):
        _bad("hadamard", setting, HADAMARD_HELP)
    if width % setting:
        hint = hint or f"{width & -width} is the largest that does"
        _bad(
            "hadamard",
            setting,
            f"{HADAMARD_HELP}; it does not divide {what} ({hint}, and -1 takes each width's largest)",
        )
    return setting


def check_known_keys(values: dict[str, Any], known: set[str], source: str, prefix: str = ""):
    """Refuses keys outside `known`, naming each with the closest known key."""
    unknown = sorted(set(values) - known)
    if unknown:
        hints = []
        for key in unknown:
            hints.append(f"{prefix + key!r}" + did_you_mean(key, known, prefix))
        raise BitNetError(
            f"Unknown key(s) in {source}: {', '.join(hints)}. "
            f"Known keys: {', '.join(prefix + k for k in sorted(known))}."
        )


def _bad(name: str, value: Any, expected: str):
    raise BitNetError(f"BitNetConfig.{name}={value!r} is invalid: expected {expected}.")


def _check_types(config: BitNetConfig):
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if not _matches(value, hints[field.name]):
            _bad(field.name, value, f"a value of type {_describe(hints[field.name])}")


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if origin is tuple:
        return isinstance(value, (tuple, list)) and all(_matches(v, int) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")
