"""`export_hf` / `bitnet-jax export-hf`: folders that `load_hf` (our reader, checked against
transformers by tests/test_hf_parity.py) reads back to the same model.

The fixtures in tests/fixtures/hf were written by transformers itself; exporting them and reading
the export back closes the loop through a reader that was proven on files we did not write.
"""

import json
import os
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from near_ties import assert_same_forward, forward_with_quantizer_inputs, on_host

from bitnet_jax import BitNetConfig, BitNetError, BitNetLM, init_params, load_hf, pack
from bitnet_jax.cli import main
from bitnet_jax.data.tokenizer import load_tokenizer
from bitnet_jax.interop.hf_export import export_hf
from bitnet_jax.serve.load import load_model

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
# GQA with tied embeddings: the 2B4T shape in miniature (out features multiples of 4, as the
# packed Hugging Face layout needs).
CONFIG = BitNetConfig.preset(
    "tiny",
    vocab_size=419,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    bos_token_id=417,
    eos_token_id=418,
    pad_token_id=None,
)
IDS = np.random.default_rng(0).integers(0, 417, (2, 12)).astype(np.int32)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(FIXTURES / "packed_bitlinear", bos_id=417, eos_id=418)


def _logits(config, params):
    return np.asarray(jax.jit(BitNetLM(config).apply)({"params": params}, IDS))


def _flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_float32_master_weights_round_trip_bit_for_bit(tmp_path, tokenizer):
    # A transformers-written fp32 folder (MHA, untied lm_head): read, export, read again.
    config, params = load_hf(FIXTURES / "online_fp32_mha_untied")
    export_hf(config, params, tokenizer, tmp_path / "out", dtype="float32")
    config2, params2 = load_hf(tmp_path / "out")
    assert config2 == config
    want, got = _flat(params), _flat(params2)
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_bf16_master_weights_are_the_params_rounded_once(tmp_path, tokenizer):
    params = init_params(CONFIG, seed=1)
    export_hf(CONFIG, params, tokenizer, tmp_path / "out")  # bf16, the default
    config2, params2 = load_hf(tmp_path / "out")
    assert config2 == CONFIG
    rounded = jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16).astype(np.float32), params)
    want, got = _flat(rounded), _flat(params2)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    # Same parameters, same program: the logits are identical.
    np.testing.assert_array_equal(_logits(config2, params2), _logits(CONFIG, rounded))
    hf_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert hf_config["quantization_config"]["quantization_mode"] == "online"
    assert hf_config["torch_dtype"] == "bfloat16"


def _codes_and_scales(config, params):
    packed = pack(config, params, lm_head="float")
    return {
        name: (np.asarray(value["w_packed"]), np.asarray(value["w_scale"]))
        for block in ("self_attn", "mlp")
        for name, value in packed["layers"][block].items()
        if "w_packed" in value
    }


def assert_scales_match(got, want, codes, name):
    """The per-tensor scales of two packings of the same ternary codes, each the mean|W| of float32
    weights. load_hf makes a folder's master weights W' = t * s / p (p the fraction of non-zeros),
    so mean|W'| is s up to float32 rounding: s / p rounded once, a sum of n terms, a division.
    Whatever order XLA sums in (it differs between CPUs: SIMD width, lanes), a float32 sum of n
    non-negative terms is within (n - 1) * 2^-24 of the exact sum, relatively (Higham, Accuracy
    and Stability of Numerical Algorithms, 4.2); the other side's mean is bounded alike, so the
    two differ by at most 2 * (n + 1) * 2^-24, with n <= 4 codes per packed byte. Summing n equal
    terms, as W' has, rounds the same way at every step, so its error approaches the bound: on a
    Zen 4, 174 ulps of 2048 terms, beyond the old fixed rtol=1e-5. A wrong scale (its reciprocal,
    a mean over the non-zeros only, another tensor's) is off by far more."""
    n = 4 * codes.size
    np.testing.assert_allclose(got, want, rtol=2 * (n + 1) * 2.0**-24, err_msg=name)


def test_packed_export_holds_the_ternary_codes_and_scales(tmp_path, tokenizer):
    params = init_params(CONFIG, seed=2)
    export_hf(CONFIG, params, tokenizer, tmp_path / "out", packed=True)
    hf_config = json.loads((tmp_path / "out" / "config.json").read_text())
    quant = hf_config["quantization_config"]
    assert (quant["linear_class"], quant["quantization_mode"]) == ("autobitlinear", "offline")
    config2, params2 = load_hf(tmp_path / "out")
    assert config2 == CONFIG
    want, got = _codes_and_scales(CONFIG, params), _codes_and_scales(config2, params2)
    for name in want:
        # The codes are the model's own: identical.
        np.testing.assert_array_equal(got[name][0], want[name][0], err_msg=name)
        # The scale is written exactly (float32), and read back through master weights.
        assert_scales_match(got[name][1], want[name][1], want[name][0], name)
    # The forward passes then differ only where those scale ulps move an activation code across
    # a rounding boundary: the near-tie rule of tests/near_ties.py.
    model = BitNetLM(CONFIG)
    ref = on_host(forward_with_quantizer_inputs(model, {"params": params}, IDS))
    got_fwd = on_host(forward_with_quantizer_inputs(model, {"params": params2}, IDS))
    assert_same_forward(*ref, *got_fwd)


def test_packed_folder_source_and_the_cli(tmp_path):
    # transformers' 2B4T-style fixture (bitlinear, weight_scale = 1 / mean|W| in bf16) -> our
    # packed folder -> an HF packed export: the ternary codes survive both steps unchanged.
    source = FIXTURES / "packed_bitlinear"
    assert main(["convert", str(source), str(tmp_path / "packed"), "--lm-head", "float"]) == 0
    assert main(["export-hf", str(tmp_path / "packed"), str(tmp_path / "hf"), "--packed"]) == 0
    config, params = load_hf(source)
    config2, params2 = load_hf(tmp_path / "hf")
    assert config2 == config
    want, got = _codes_and_scales(config, params), _codes_and_scales(config2, params2)
    for name in want:
        np.testing.assert_array_equal(got[name][0], want[name][0], err_msg=name)
        assert_scales_match(got[name][1], want[name][1], want[name][0], name)
    np.testing.assert_array_equal(params2["embed_tokens"]["embedding"], params["embed_tokens"]["embedding"])
    # The tokenizer, its config and the stop ids travel with it.
    _, _, tokenizer = load_model(tmp_path / "hf")
    assert (tokenizer.bos_id, tokenizer.eos_id) == (417, 418)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "hf" / name).is_file(), name
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 418


def test_refusals_leave_nothing_behind(tmp_path, tokenizer, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    params = init_params(CONFIG)
    with pytest.raises(BitNetError, match="not empty.*--force"):
        export_hf(CONFIG, params, tokenizer, out)
    assert os.listdir(out) == ["keep.txt"]

    channel = CONFIG.replace(weight_quant="channel")
    for packed in (False, True):
        with pytest.raises(BitNetError, match="Only the b1.58 recipe"):
            export_hf(channel, init_params(channel), tokenizer, tmp_path / "new", packed=packed)
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no new folder, no temporary one

    # --force replaces the folder, only once the new one is complete.
    export_hf(CONFIG, params, tokenizer, out, force=True)
    assert "keep.txt" not in os.listdir(out) and (out / "model.safetensors").is_file()
    assert sorted(os.listdir(tmp_path)) == ["out"]
    # The CLI says the same, as a one-line error with exit status 2.
    assert main(["export-hf", str(FIXTURES / "packed_bitlinear"), str(out)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_online_export_of_packed_params_quantizes_back_to_the_same_codes(tmp_path, tokenizer):
    # Master weights made from a packed model (codes * scale / fraction of non-zeros) must
    # quantize back to the same codes under the per-tensor absmean quantizer.
    params = init_params(CONFIG, seed=3)
    packed = pack(CONFIG, params, lm_head="float")
    export_hf(CONFIG, packed, tokenizer, tmp_path / "out", dtype="float32")
    config2, params2 = load_hf(tmp_path / "out")
    want, got = _codes_and_scales(CONFIG, params), _codes_and_scales(config2, params2)
    for name in want:
        np.testing.assert_array_equal(got[name][0], want[name][0], err_msg=name)
        assert_scales_match(got[name][1], want[name][1], want[name][0], name)
