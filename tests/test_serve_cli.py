"""`bitnet-jax convert / generate / chat / bench kernels / bench generate` end to end, on the HF
fixtures and tiny shapes (no timing asserts: these machines are shared)."""

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bitnet_jax import BitNetConfig, ffi, generate, load_hf
from bitnet_jax.chat import chat_loop, render_chat, stop_ids
from bitnet_jax.cli import load_model, main
from bitnet_jax.errors import BitNetError
from bitnet_jax.pack import load_packed
from bitnet_jax.tokenizer import StreamDecoder

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
# A LLaMA-3-style template (the shape of 2B4T's), written here for the test.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


@pytest.fixture(scope="module")
def packed_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "m"
    assert main(["convert", str(FIXTURES / "packed_bitlinear"), str(out)]) == 0
    return out


def test_convert_then_generate_matches_transformers(packed_folder, capsys):
    config, params, tokenizer = load_model(str(packed_folder))
    assert tokenizer.bos_id == 417  # the tokenizer came along
    expected = np.load(FIXTURES / "packed_bitlinear" / "expected.npz")
    float_folder = packed_folder.parent / "float"
    assert main(["convert", str(FIXTURES / "packed_bitlinear"), str(float_folder), "--lm-head", "float"]) == 0
    config, params = load_packed(str(float_folder))
    new_ids = generate(config, params, expected["greedy_prompts"], 16)
    np.testing.assert_array_equal(new_ids, expected["greedy_new_ids"])


def test_generate_cli_streams_and_reports_speed(packed_folder, capsys):
    assert main(["generate", "--model", str(packed_folder), "--prompt", "hello", "--max-new-tokens", "6",
                 "--verbose"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("hello") and "first token after" in err and "tokens/s" in err
    assert main(["generate", "--model", str(packed_folder), "--prompt", "hi", "--max-new-tokens", "5000"]) == 2
    assert "context is 4096 tokens" in capsys.readouterr().err


def test_chat_template_renders_like_llama3():
    text = render_chat(LLAMA3_TEMPLATE, [{"role": "user", "content": "Hi "}], bos_token="<s>")
    assert text == "<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    with pytest.raises(BitNetError, match="does not render"):
        render_chat("{% for %}", [])


def test_chat_loop_uses_the_template_and_keeps_history(packed_folder, tmp_path):
    folder = tmp_path / "chat"
    shutil.copytree(packed_folder, folder)
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(tok_config, chat_template=LLAMA3_TEMPLATE)))
    config, params, tokenizer = load_model(str(folder))
    assert set(config.eos_ids) <= set(stop_ids(tokenizer, config))
    turns, out = iter(["hello there", "and again", ""]), io.StringIO()
    assert chat_loop(config, params, tokenizer, str(folder), max_new_tokens=5, read=lambda _: next(turns), write=out) == 0
    assert len(out.getvalue().splitlines()) == 2  # one streamed reply per turn
    # The reply to turn one is what generate gives for the rendered prompt (this tokenizer decodes
    # BOS to "", so the template gets bos_token="" and the BOS id is prepended).
    assert tokenizer.decode([tokenizer.bos_id]) == ""
    text = render_chat(LLAMA3_TEMPLATE, [{"role": "user", "content": "hello there"}], bos_token="")
    prompt = [tokenizer.bos_id] + tokenizer.encode(text)
    ids = generate(config, params, [prompt], 5, stop_ids=stop_ids(tokenizer, config))[0]
    stream = StreamDecoder(tokenizer)
    want = "".join(stream.push(int(i)) for i in ids if i not in stop_ids(tokenizer, config)) + stream.flush()
    assert out.getvalue().splitlines()[0] == want.splitlines()[0]


def test_bench_kernels_small(tmp_path, capsys):
    from bitnet_jax.bench_serve import bench_kernels, kernels_table

    results = bench_kernels(rows=(1, 5), shapes=((300, 9), (200, 130_001)), repeats=1, isas=ffi.available_isas())
    kernels = {(r.kernel, r.isa) for r in results}
    assert {("ternary", "scalar"), ("int8", "scalar"), ("xla_f32", "xla"), ("xla_bf16", "xla")} <= kernels
    assert {isa for _, isa in kernels} == set(ffi.available_isas()) | {"xla"}
    assert all(r.median_us > 0 and r.threads >= 1 for r in results)
    table = kernels_table(results)
    assert "300 x 9" in table and "xla_bf16" in table


def test_bench_generate_small():
    from bitnet_jax.bench_serve import bench_generate, generate_table

    config = BitNetConfig.preset("tiny")
    ffi = bench_generate(config, "ffi", prompt_tokens=16, new_tokens=4, repeats=1)
    xla = bench_generate(config, "xla", prompt_tokens=16, new_tokens=4, repeats=1)
    for r in (ffi, xla):
        assert r.prefill_tok_s > 0 and r.decode_tok_s > 0 and r.peak_rss_mb > 0
    assert ffi.weight_mb < xla.weight_mb  # 2-bit layers and an int8 lm_head against f32
    assert "FFI vs XLA dense" in generate_table([ffi, xla])


def test_bad_serving_requests(capsys, tmp_path):
    assert main(["bench", "kernels", "--threads", "0"]) == 2
    assert "--threads 0: expected a positive number" in capsys.readouterr().err
    assert main(["bench", "generate", "--random-weights", "--threads", "0"]) == 2
    assert main(["bench", "generate", "--random-weights", "--preset", "huge"]) == 2
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
