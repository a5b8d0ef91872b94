"""Comparing two runs of a quantized model that differ only in the order of float sums (sharded
against one device, FFI kernels against XLA ops), with near-ties handled by a stated rule.

Where a reordered sum moves a value across a rounding boundary, a ternary or int8 code flips in
one run: a quantization step, not float noise, and how many such near-ties a run meets depends
on the CPU (its vector width decides XLA's summation order), not on the code. So a comparison
must not count tokens within a tolerance. `forward_with_quantizer_inputs` records what every
quantizer rounds, before rounding; `assert_same_forward` then follows the forward pass layer by
layer and checks that every difference beyond float noise is explained by a code that flipped at
a near-tie.
"""

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from bitnet_jax.kernels.ops import BACKENDS, ServingSpec
from bitnet_jax.model.hadamard import rotate_input
from bitnet_jax.model.layers import BitLinear
from bitnet_jax.model.quant import act_ratio, weight_ratio
from bitnet_jax.model.serving_layers import TernaryLinear, serving_variables
from bitnet_jax.model.transformer import BitNetLM


def _sow_quantizer_inputs(next_fun, args, kwargs, context):
    """A Flax method interceptor: every BitLinear sows what its quantizers round, before rounding
    (`weight_ratio`, `act_ratio`), and the weight scale; every serving TernaryLinear, what its
    kernel's per-token activation quantizer rounds (its weights are fixed codes). An H-BitLinear's
    quantizer rounds its rotated input."""
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name != "__call__":
        return out
    if isinstance(module, BitLinear):
        assert module.quant.input_norm_eps is None, "the input RMSNorm would sit between x and the quantizer"
        ratio, scale = weight_ratio(nn.unbox(module.get_variable("params", "kernel")), module.quant.weight)
        module.sow("intermediates", "weight_ratio", ratio)
        module.sow("intermediates", "weight_scale", scale)
        x = rotate_input(args[0], module.hadamard, module.hadamard_seed)
        module.sow("intermediates", "act_ratio", act_ratio(x, module.quant.act, module.quant.act_bits)[0])
    elif isinstance(module, TernaryLinear):
        assert module.input_norm_eps is None, "the input RMSNorm would sit between x and the quantizer"
        x = rotate_input(args[0], module.hadamard, module.hadamard_seed)
        module.sow("intermediates", "act_ratio", act_ratio(x, "token", module.spec.act_bits)[0])
    return out


def forward_with_quantizer_inputs(model, variables, ids):
    """(logits, {"<linear path>/<weight_ratio|weight_scale|act_ratio>": [L, ...]}) of one forward."""
    with nn.intercept_methods(_sow_quantizer_inputs):
        logits, state = model.apply(variables, ids, mutable=["intermediates"])
    sown = traverse_util.flatten_dict(state["intermediates"], sep="/")
    return logits, {name: values[0] for name, values in sown.items()}


def on_host(outputs):
    """`forward_with_quantizer_inputs`' outputs as numpy arrays."""
    logits, sown = outputs
    return np.asarray(logits), {name: np.asarray(values) for name, values in sown.items()}


def jitted_forward(model, variables, ids):
    """Logits and the quantizers' sowed inputs of one jitted forward, as numpy."""
    return on_host(jax.jit(lambda v, i: forward_with_quantizer_inputs(model, v, i))(variables, ids))


# The linear layers of a decoder layer, in the order the forward pass runs them.
LINEARS = [
    "self_attn/q_proj",
    "self_attn/k_proj",
    "self_attn/v_proj",
    "self_attn/o_proj",
    "mlp/gate_proj",
    "mlp/up_proj",
    "mlp/down_proj",
]
F32_EPS = 2.0**-24  # unit roundoff of float32
# Tokens that no flipped code reached differ by float noise only. The sums reordered in the
# tests' models have a few hundred terms at most, a few such sums deep (worst case ~300 u = 2e-5 relative per
# sum, typically sqrt(300) u);
# measured: up to 1e-5 of the absmax scale in pre-rounding activations (x * 127 / max|x|) and
# 1.6e-5 of the largest |logit| in logits, on AMD Zen 3 (AVX2). The tolerances are 10x and 20x
# that, and 10x below what one flipped int8 code does to the logits (~4e-3 of the largest).
ACT_TOL = 1e-4 * 127
LOGIT_TOL = 3e-4  # relative to the token's largest |logit|


def scale_error_bound(ratio_shape, scale_shape) -> float:
    """Relative error bound of one absmean scale (of one layer), summed in any order: a sum of n
    nonnegative float32 terms is off by at most (n - 1) u of its value, and the division by n
    adds one u."""
    terms = int(np.prod(ratio_shape)) // int(np.prod(scale_shape))
    return (terms + 1) * F32_EPS


def assert_same_forward(ref_logits, ref_sown, got_logits, got_sown, min_clean=0.5) -> np.ndarray:
    """Logits of one forward pass, run twice (ref, got) with the quantizers' inputs sowed
    (`forward_with_quantizer_inputs`), agree up to what another order of float sums may change.

    The check follows the forward pass layer by layer:
      * each weight scale is within `scale_error_bound` of the reference, and every weight code
        that differs sat, in the reference, within that bound of a boundary (|r| = 0.5);
      * at each linear layer, the activations of every token that no flip has reached yet agree
        to ACT_TOL; a token whose int8 code flips is reached, and so are the later tokens of its
        row (attention); a flipped weight reaches every token;
      * the logits of tokens never reached agree to LOGIT_TOL, and at least `min_clean` of the
        tokens are such tokens (else there would be little left to check).
    Weights are checked where both runs sowed them (fake-quant BitLinear; serving weights are
    fixed codes).
    A wrong program (a missing reduction, a scale per shard, other parameters or data) fails the
    first check it meets; only near-ties are excused, and each excuse is checked.
    Returns the [B, T] mask of tokens never reached.
    """
    num_layers = ref_sown[f"layers/{LINEARS[0]}/act_ratio"].shape[0]
    reached_bt = np.zeros(ref_logits.shape[:2], bool)
    for layer in range(num_layers):
        for linear in LINEARS:
            where = f"layer {layer} {linear}"
            weights = f"layers/{linear}/weight_ratio"
            if weights in ref_sown and weights in got_sown and _weights_flipped(ref_sown, got_sown, linear, layer):
                reached_bt[:] = True
            act_ref = ref_sown[f"layers/{linear}/act_ratio"][layer]
            act_got = got_sown[f"layers/{linear}/act_ratio"][layer]
            np.testing.assert_array_less(np.abs(act_got - act_ref)[~reached_bt], ACT_TOL, err_msg=where)
            code_flipped_bt = (np.round(act_ref) != np.round(act_got)).any(axis=-1)
            reached_bt |= np.maximum.accumulate(code_flipped_bt, axis=1)
    clean_bt = ~reached_bt
    assert np.mean(clean_bt) >= min_clean, f"only {np.mean(clean_bt):.0%} of the tokens met no flipped code"
    logit_error_bt = np.abs(got_logits - ref_logits).max(axis=-1) / np.abs(ref_logits).max(axis=-1)
    np.testing.assert_array_less(logit_error_bt[clean_bt], LOGIT_TOL)
    return clean_bt


def _weights_flipped(ref_sown, got_sown, linear: str, layer: int) -> bool:
    """Checks one layer's weight scales and codes (see `assert_same_forward`); whether any code flipped."""
    where = f"layer {layer} {linear}"
    ratio_ref, ratio_got = (sown[f"layers/{linear}/weight_ratio"][layer] for sown in (ref_sown, got_sown))
    scale_ref, scale_got = (sown[f"layers/{linear}/weight_scale"][layer] for sown in (ref_sown, got_sown))
    bound = scale_error_bound(ratio_ref.shape, scale_ref.shape)
    np.testing.assert_array_less(np.abs(scale_got - scale_ref), bound * scale_ref, err_msg=where)
    flipped = np.clip(np.round(ratio_ref), -1, 1) != np.clip(np.round(ratio_got), -1, 1)
    # r = w / s computed with a scale off by `bound`, and rounded once more.
    margin, allowed = np.abs(np.abs(ratio_ref) - 0.5), np.abs(ratio_ref) * (bound + 3 * F32_EPS)
    assert np.all(margin[flipped] <= allowed[flipped]), (where, margin[flipped])
    return bool(flipped.any())


def assert_packed_matches_fake_quant(config, params, packed, ids, backends=BACKENDS):
    """Packed serving against fake-quant training on the same weights: the forward of `packed`
    (`pack(config, params, lm_head="float")`) on each of `backends` against the training forward
    of `params`, by `assert_same_forward`."""
    want = jitted_forward(BitNetLM(config), {"params": params}, ids)
    for backend in backends:
        spec = ServingSpec(backend, "float", config.act_bits)
        assert_same_forward(*want, *jitted_forward(BitNetLM(config, spec), serving_variables(packed), ids))
