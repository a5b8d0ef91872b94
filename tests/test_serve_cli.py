"""`bitnet-jax convert / generate / chat / bench kernels / bench generate` end to end, on the HF
fixtures and tiny shapes (no timing asserts: these machines are shared)."""

import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from bitnet_jax import BitNetConfig, generate
from bitnet_jax.cli import main
from bitnet_jax.data.tokenizer import load_tokenizer
from bitnet_jax.data.tokenizer_training import train_sentencepiece
from bitnet_jax.errors import BitNetError
from bitnet_jax.kernels import ffi, layout
from bitnet_jax.serve.chat import chat_loop, chat_prompt_ids, render_chat, stop_ids
from bitnet_jax.serve.load import load_model
from bitnet_jax.serve.packed_folder import load_packed
from bitnet_jax.serve.streaming import StreamDecoder

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
# A LLaMA-3-style template (the shape of 2B4T's), written here for the test.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


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
    assert (
        main(["generate", "--model", str(packed_folder), "--prompt", "hello", "--max-new-tokens", "6", "--verbose"])
        == 0
    )
    out, err = capsys.readouterr()
    assert out.startswith("hello") and "first token after" in err and "tokens/s" in err
    args = ["generate", "--model", str(packed_folder), "--prompt", "hello", "--max-new-tokens", "6", "--kv-cache"]
    assert main([*args, "int8"]) == 0 and capsys.readouterr().out.startswith("hello")
    with pytest.raises(SystemExit):  # not a choice: argparse's usage error
        main([*args, "bfloat16"])
    assert "invalid choice: 'bfloat16'" in capsys.readouterr().err
    assert main(["generate", "--model", str(packed_folder), "--prompt", "hi", "--max-new-tokens", "5000"]) == 2
    assert "context is 4096 tokens" in capsys.readouterr().err


def test_chat_template_renders_like_llama3():
    text = render_chat(LLAMA3_TEMPLATE, [{"role": "user", "content": "Hi "}], bos_token="<s>")
    header = "<|start_header_id|>{}<|end_header_id|>\n\n"
    assert text == "<s>" + header.format("user") + "Hi<|eot_id|>" + header.format("assistant")
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
    assert (
        chat_loop(config, params, tokenizer, str(folder), max_new_tokens=5, read=lambda _: next(turns), write=out) == 0
    )
    assert len(out.getvalue().splitlines()) == 2  # one streamed reply per turn
    # The reply to turn one is what generate gives for the rendered prompt (the template writes
    # the BOS string, which this tokenizer.json encodes as the BOS id).
    text = render_chat(LLAMA3_TEMPLATE, [{"role": "user", "content": "hello there"}], bos_token="<|begin_of_text|>")
    prompt = tokenizer.encode(text)
    assert prompt[0] == tokenizer.bos_id and prompt.count(tokenizer.bos_id) == 1
    ids = generate(config, params, [prompt], 5, stop_ids=stop_ids(tokenizer, config))[0]
    stream = StreamDecoder(tokenizer)
    want = "".join(stream.push(int(i)) for i in ids if i not in stop_ids(tokenizer, config)) + stream.flush()
    assert out.getvalue().splitlines()[0] == want.splitlines()[0]


# Uses both special tokens, as chat templates that end each turn with eos_token do.
SPECIALS_TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"


def test_chat_template_gets_the_tokenizers_special_strings(tmp_path):
    # decode() drops special tokens; the template must get their strings, and the prompt their ids.
    hf = load_tokenizer(FIXTURES / "packed_bitlinear")
    assert (hf.id_to_token(hf.bos_id), hf.id_to_token(hf.eos_id)) == ("<|begin_of_text|>", "<|end_of_text|>")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert chat_prompt_ids(SPECIALS_TEMPLATE, messages, hf) == [417, *hf.encode("hi"), 418, *hf.encode("yo"), 418]
    # sentencepiece encodes '<s>' in text as characters: the prompt must still hold the ids.
    sp = train_sentencepiece([], 300, tmp_path, texts=["def f(x):\n    return x + 1\n" * 40])
    assert (sp.id_to_token(sp.bos_id), sp.id_to_token(sp.eos_id)) == ("<s>", "</s>")
    assert chat_prompt_ids(SPECIALS_TEMPLATE, messages, sp) == [1, *sp.encode("hi"), 2, *sp.encode("yo"), 2]
    # Without a template (or one that leaves BOS out) the BOS id still leads, once.
    assert chat_prompt_ids(None, messages[:1], hf) == [417, *hf.encode("User: hi\nAssistant:")]


def test_chat_cli_top_k(packed_folder, capsys, monkeypatch):
    def chat(*flags):
        monkeypatch.setattr("sys.stdin", io.StringIO("hello there\n"))
        assert main(["chat", "--model", str(packed_folder), "--max-new-tokens", "6", *flags]) == 0
        return capsys.readouterr().out

    # Sampling from the single most likely token is greedy decoding, at any temperature.
    greedy = chat()
    assert chat("--temperature", "5", "--top-k", "1") == greedy


def test_generate_stops_at_generation_config_eos(tmp_path, capsys):
    folder = tmp_path / "hf"
    shutil.copytree(FIXTURES / "packed_bitlinear", folder)
    config, params, tokenizer = load_model(str(folder))
    prompt = [tokenizer.bos_id] + tokenizer.encode("hello")
    ids = [int(i) for i in generate(config, params, [prompt], 8)[0]]  # the uninterrupted run
    # A chat model's end of turn (LLaMA-3's <|eot_id|>) is named only in generation_config.json:
    # stand in for it with a token the uninterrupted run emits, not at its first step.
    cut = next(j for j in range(1, 8) if ids[j] not in ids[:j] and ids[j] not in config.eos_ids)
    assert not set(ids[:cut]) & set(config.eos_ids)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [config.eos_ids[0], ids[cut]]}))
    assert main(["generate", "--model", str(folder), "--prompt", "hello", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == "hello" + tokenizer.decode(ids[:cut]) + "\n"
    assert ids[cut] in stop_ids(tokenizer, config, str(folder))  # chat stops there too
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 100_000}))
    assert main(["generate", "--model", str(folder), "--prompt", "hello"]) == 2
    assert "eos_token_id 100000 is not a token id of this model" in capsys.readouterr().err


def test_bench_kernels_small(tmp_path, capsys):
    from bitnet_jax.bench.serve import bench_kernels, kernels_table

    results = bench_kernels(rows=(1, 5), shapes=((300, 9), (200, 130_001)), repeats=1, isas=ffi.available_isas())
    kernels = {(r.kernel, r.isa) for r in results}
    assert {("ternary", "scalar"), ("int8", "scalar"), ("xla_f32", "xla"), ("xla_bf16", "xla")} <= kernels
    assert {isa for _, isa in kernels} == set(ffi.available_isas()) | {"xla"}
    assert all(r.median_us > 0 and r.threads >= 1 for r in results)
    table = kernels_table(results)
    assert "300 x 9" in table and "xla_bf16" in table


def test_bench_generate_small():
    from bitnet_jax.bench.serve import bench_generate, generate_table

    config = BitNetConfig.preset("tiny")
    ffi = bench_generate(config, "ffi", prompt_tokens=16, new_tokens=4, repeats=1)
    xla = bench_generate(config, "xla", prompt_tokens=16, new_tokens=4, repeats=1)
    for r in (ffi, xla):
        assert r.prefill_tok_s > 0 and r.decode_tok_s > 0 and r.peak_rss_mb > 0
    assert ffi.weight_mb < xla.weight_mb  # 2-bit layers and an int8 lm_head against f32
    int8 = bench_generate(config, "ffi", prompt_tokens=16, new_tokens=4, repeats=1, kv_cache="int8")
    h = config.head_dim  # per slot, kv head and layer: H int8 codes and a float32 scale, against 4H bytes
    assert int8.kv_mb == pytest.approx(ffi.kv_mb * (h + 4) / (4 * h)) and int8.decode_tok_s > 0
    assert "FFI vs XLA dense" in generate_table([ffi, xla])
    # Group scales: random packed weights with a scale per 64 inputs, on the kernel and on the XLA
    # integer path; the scales are bytes each decoded token reads, and the codes are TQ2G tiles
    # (K padded to 64, not 256) where the per-tensor model's are TQ2B.
    grouped = config.replace(weight_quant="group:64")
    group_ffi = bench_generate(grouped, "ffi", prompt_tokens=16, new_tokens=4, repeats=1)
    group_xla = bench_generate(grouped, "xla-packed", prompt_tokens=16, new_tokens=4, repeats=1)
    linears = [(k, n) for names in config.linear_shapes.values() for k, n in names.values()]
    scales = sum(4 * math.prod(layout.group_scales_shape(n, k // 64)) for k, n in linears)
    codes_change = sum(
        math.prod(layout.packed_ternary_tiles_shape(n, k)) - math.prod(layout.packed_ternary_shape(n, k))
        for k, n in linears
    )
    per_layer = scales - 7 * 4 + codes_change  # the 7 per-tensor scales give way to the group ones
    assert group_ffi.layers_mb == pytest.approx(ffi.layers_mb + config.num_hidden_layers * per_layer / 1e6)
    assert group_xla.isa == "xla" and group_xla.decode_tok_s > 0
    assert "FFI vs the XLA integer path" in generate_table([group_ffi, group_xla])


def test_bad_serving_requests(capsys, tmp_path):
    assert main(["bench", "kernels", "--threads", "0"]) == 2
    assert "--threads 0: expected a positive number" in capsys.readouterr().err
    assert main(["bench", "kernels", "--shapes", "2560by6912"]) == 2
    assert "--shapes 2560by6912: expected comma-separated KxN" in capsys.readouterr().err
    assert main(["bench", "generate", "--random-weights", "--threads", "0"]) == 2
    assert main(["bench", "generate", "--random-weights", "--preset", "huge"]) == 2
    assert main(["bench", "generate", "--random-weights", "--preset", "tiny", "--weight-quant", "group:7"]) == 2
    assert main(["bench", "generate", "--random-weights", "--backends", "ffi,xla-int"]) == 2
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2


def test_serving_imports_no_training_libraries():
    """Serving a folder imports neither orbax (and its tensorstore) nor grain nor optax: in a fresh
    process, `import bitnet_jax` and the serving modules took 245 MB resident with them and 211 MB
    without, a share of the <= 1.2 GB that 2B4T serving may use (benchmarks/RESULTS.md)."""
    import subprocess
    import sys

    code = (
        "import sys, bitnet_jax, bitnet_jax.cli.app, bitnet_jax.serve.load, bitnet_jax.serve.generate, "
        "bitnet_jax.serve.chat, bitnet_jax.serve.compile_cache, bitnet_jax.bench.serve\n"
        "print(sorted(m for m in ('orbax.checkpoint', 'tensorstore', 'grain', 'optax') if m in sys.modules))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]", run.stdout
