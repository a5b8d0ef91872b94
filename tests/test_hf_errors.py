"""load_hf on bad folders: each failure is a BitNetError that names the file, what was expected,
what was found and what to do (never a deep traceback from safetensors or json)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from bitnet_jax import BitNetError, load_hf

FIXTURES = Path(__file__).parent / "fixtures" / "hf"


@pytest.fixture
def folder(tmp_path):
    """A writable copy of a small single-file online checkpoint."""
    dst = tmp_path / "model"
    shutil.copytree(FIXTURES / "online_fp32_mha_untied", dst)
    return dst


def rewrite_config(folder: Path, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def rewrite_weights(folder: Path, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


def test_missing_folder(tmp_path):
    with pytest.raises(BitNetError, match="does not exist"):
        load_hf(tmp_path / "nowhere")


def test_missing_config(folder):
    (folder / "config.json").unlink()
    with pytest.raises(BitNetError, match="no config.json"):
        load_hf(folder)


def test_corrupt_config_json(folder):
    (folder / "config.json").write_text('{"model_type": "bitnet", ')
    with pytest.raises(BitNetError, match="not valid JSON"):
        load_hf(folder)


def test_config_of_another_model_type(folder):
    rewrite_config(folder, model_type="llama")
    with pytest.raises(BitNetError, match="llama") as error:
        load_hf(folder)
    assert "bitnet" in str(error.value)


def test_unknown_quantization_method(folder):
    rewrite_config(folder, quantization_config={"quant_method": "gptq"})
    with pytest.raises(BitNetError, match="quant_method='gptq'"):
        load_hf(folder)


def test_missing_weights_file(folder):
    (folder / "model.safetensors").unlink()
    with pytest.raises(BitNetError, match="no model.safetensors"):
        load_hf(folder)


def test_pickle_checkpoint_is_refused_with_a_conversion_hint(folder):
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(BitNetError, match="pickle") as error:
        load_hf(folder)
    assert "save_pretrained" in str(error.value)


def test_missing_tensor(folder):
    rewrite_weights(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(BitNetError, match=r"'model.layers.1.mlp.up_proj.weight' is missing"):
        load_hf(folder)


def test_wrongly_shaped_tensor(folder):
    def edit(tensors):
        w = tensors["model.layers.0.self_attn.q_proj.weight"]
        tensors["model.layers.0.self_attn.q_proj.weight"] = np.ascontiguousarray(w[:-16])

    rewrite_weights(folder, edit)
    with pytest.raises(BitNetError, match=r"q_proj.weight has shape \[64, 80\]; expected \[80, 80\]"):
        load_hf(folder)


def test_config_that_disagrees_with_the_weights(folder):
    rewrite_config(folder, intermediate_size=144)
    with pytest.raises(BitNetError, match="expected"):
        load_hf(folder)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_safetensors(folder, keep):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(BitNetError, match="truncated or corrupt"):
        load_hf(folder)


def test_garbage_safetensors_header(folder):
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(BitNetError, match="truncated or corrupt"):
        load_hf(folder)


def test_sharded_checkpoint_with_a_missing_shard(tmp_path):
    dst = tmp_path / "sharded"
    shutil.copytree(FIXTURES / "sharded_online_bf16", dst)
    (dst / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(BitNetError, match="model-00002-of-00003.safetensors .*does not exist"):
        load_hf(dst)


def test_corrupt_sharded_index(tmp_path):
    dst = tmp_path / "sharded"
    shutil.copytree(FIXTURES / "sharded_online_bf16", dst)
    (dst / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(BitNetError, match="not a valid safetensors index"):
        load_hf(dst)


def test_offline_weights_that_are_not_ternary(tmp_path):
    dst = tmp_path / "packed"
    shutil.copytree(FIXTURES / "packed_autobitlinear", dst)
    name = "model.layers.0.self_attn.q_proj.weight"

    def edit(tensors):
        packed = tensors[name]
        out = packed.shape[0] * 4
        tensors[name] = np.full((out, packed.shape[1]), 0.5, np.float32)

    rewrite_weights(dst, edit)
    with pytest.raises(BitNetError, match="not ternary"):
        load_hf(dst)
