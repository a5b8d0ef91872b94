"""BitNetConfig and RunConfig: presets, validation messages, Hugging Face config.json mapping."""

import pytest

from bitnet_jax import BitNetConfig, BitNetError
from bitnet_jax.interop.hf import config_from_hf, config_to_hf
from bitnet_jax.train.run_config import load_run_config


def test_2b4t_preset_matches_the_model_card():
    c = BitNetConfig.preset("b1.58-2b4t")
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (2560, 6912, 30)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (20, 5, 128)
    assert (c.vocab_size, c.rope_theta, c.max_position_embeddings) == (128256, 500000.0, 4096)
    assert c.tie_word_embeddings and c.hidden_act == "relu2" and c.eos_ids == (128001,)
    # The model card's "0.4 GB non-embedding memory": ternary weights at 1.58 bits.
    non_embedding = c.num_params - c.vocab_size * c.hidden_size
    assert 0.39e9 < non_embedding * 1.58 / 8 < 0.42e9


def test_700m_preset():
    c = BitNetConfig.preset("b1.58-700m")
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads) == (1536, 4096, 24, 16)
    assert (c.vocab_size, c.rope_theta) == (32002, 10000.0)


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"hiden_size": 64}, ["hiden_size", "hidden_size"]),
        ({"num_key_value_heads": 3}, ["num_key_value_heads", "divisor"]),
        ({"weight_quant": "rows"}, ["weight_quant", "group:G"]),
        ({"weight_quant": "group:5"}, ["weight_quant", "divides"]),
        ({"act_quant": "channel"}, ["act_quant", "token"]),
        ({"act_bits": 16}, ["act_bits", "2 to 8"]),
        ({"hidden_size": "wide"}, ["hidden_size", "int"]),
        ({"eos_token_id": 99999}, ["eos_token_id", "vocab_size"]),
        ({"hidden_act": "gelu"}, ["hidden_act", "relu2"]),
    ],
)
def test_bad_fields_are_named(changes, words):
    with pytest.raises(BitNetError) as info:
        BitNetConfig.preset("tiny", **changes)
    for word in words:
        assert word in str(info.value)


def test_hf_config_both_rope_layouts():
    base = {
        "model_type": "bitnet",
        "vocab_size": 100,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    assert config_from_hf({**base, "rope_theta": 123.0}).rope_theta == 123.0
    assert config_from_hf({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}}).rope_theta == 7.0
    with pytest.raises(BitNetError, match="model_type='llama'"):
        config_from_hf({**base, "model_type": "llama"})
    with pytest.raises(BitNetError, match="rope_type"):
        config_from_hf({**base, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}})


def test_hf_roundtrip():
    c = BitNetConfig.preset("tiny", tie_word_embeddings=False)
    assert config_from_hf(config_to_hf(c)) == c
    with pytest.raises(BitNetError, match="Hugging Face equivalent"):
        config_to_hf(c.replace(act_bits=4))


def test_run_config_overrides_and_errors(tmp_path):
    run = load_run_config(None, ["steps=7", "model.weight_quant=channel", "corpus_suffixes=['.txt']"])
    assert run.steps == 7 and run.model.weight_quant == "channel" and run.corpus_suffixes == (".txt",)
    with pytest.raises(BitNetError, match="'stpes' \\(did you mean 'steps'\\?\\)"):
        load_run_config(None, ["stpes=7"])
    with pytest.raises(BitNetError, match="key=value"):
        load_run_config(None, ["steps"])
    with pytest.raises(BitNetError, match="learning_rate"):
        load_run_config(None, ["learning_rate=-1"])
    with pytest.raises(BitNetError, match="seq_len"):
        load_run_config(None, ["seq_len=100000"])
    with pytest.raises(BitNetError, match="does not exist"):
        load_run_config(str(tmp_path / "nope.py"))
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config():\n    return {'model': {'preset': 'tiny'}, 'batch': 3}\n")
    with pytest.raises(BitNetError, match="'batch'"):
        load_run_config(str(bad))
