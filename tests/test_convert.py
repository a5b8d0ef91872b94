"""Converting Hugging Face folders a layer at a time (`pack.convert_hf`, `bitnet-jax convert`)
against packing the whole model at once (`pack(*load_hf(folder))`), bit for bit, and the file
modes of a converted folder."""

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file

from bitnet_jax import load_hf, pack, save_packed
from bitnet_jax.cli import main
from bitnet_jax.model import serving_layers
from bitnet_jax.serve.pack import convert_hf

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
CASES = [  # (fixture, lm_head): every weight layout, sharding, tied and untied, each lm_head kind
    ("packed_bitlinear", "int8-tied"),
    ("packed_bitlinear", "int8"),
    ("packed_autobitlinear", "float"),
    ("online_fp32_mha_untied", "int8"),
    ("online_fp32_mha_untied", "float"),
    ("sharded_online_bf16", "int8-tied"),
    ("online_bf16_gqa_tied", "float"),
    ("online_bf16_gqa_tied", "int4-tied"),
    ("online_fp32_mha_untied", "int4"),
]


def assert_same_bits(got: dict, expected: dict):
    got, expected = flatten_dict(got), flatten_dict(expected)
    assert sorted(got) == sorted(expected)
    for path, want in expected.items():
        have, want = np.asarray(got[path]), np.asarray(want)
        assert (have.dtype, have.shape) == (want.dtype, want.shape), path
        assert have.tobytes() == want.tobytes(), path


@pytest.mark.parametrize("case, lm_head", CASES)
def test_layer_by_layer_equals_packing_all_at_once(case, lm_head, monkeypatch):
    # Quantized tables in uneven blocks of rows, as a 2B4T embedding is quantized (fixtures are < 4096 rows).
    monkeypatch.setattr(serving_layers, "_TABLE_ROWS_PER_STEP", 96)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither path may leave a tensor unread
        config, params = load_hf(FIXTURES / case)
        expected = pack(config, params, lm_head=lm_head)
        got_config, got = convert_hf(FIXTURES / case, lm_head=lm_head)
    assert got_config == config
    assert_same_bits(got, expected)


def test_convert_cli_writes_the_weights_of_pack(tmp_path):
    folder = FIXTURES / "packed_bitlinear"
    assert main(["convert", str(folder), str(tmp_path / "out")]) == 0
    expected = {".".join(path): value for path, value in flatten_dict(pack(*load_hf(folder))).items()}
    assert_same_bits(load_file(tmp_path / "out" / "model.safetensors"), expected)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_get_the_umask_mode(tmp_path, umask):
    config, packed = convert_hf(FIXTURES / "packed_bitlinear")
    previous = os.umask(umask)
    try:
        save_packed(str(tmp_path / "out"), config, packed)
    finally:
        os.umask(previous)
    for name in ("model.safetensors", "config.json"):
        assert os.stat(tmp_path / "out" / name).st_mode & 0o777 == 0o666 & ~umask, name


def test_convert_a_packed_folder(tmp_path):
    # Same lm_head: the same tensors. Another lm_head: built from the dequantized int8 rows, the
    # ternary layers untouched.
    src = FIXTURES / "packed_bitlinear"
    assert main(["convert", str(src), str(tmp_path / "a")]) == 0
    assert main(["convert", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(b[name], a[name], err_msg=name)
    assert main(["convert", str(tmp_path / "a"), str(tmp_path / "c"), "--lm-head", "float"]) == 0
    c = load_file(tmp_path / "c" / "model.safetensors")
    assert "embed_tokens.embedding" in c and "embed_tokens.w_int8" in a
    rows = a["embed_tokens.w_int8"][:, : c["embed_tokens.embedding"].shape[1]].astype(np.float32)
    np.testing.assert_array_equal(c["embed_tokens.embedding"], rows * a["embed_tokens.w_scale"][:, None])
    for name in (n for n in a if "w_packed" in n):
        np.testing.assert_array_equal(c[name], a[name], err_msg=name)
