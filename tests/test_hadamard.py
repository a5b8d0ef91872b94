"""BitNet v2's Hadamard-rotated activations (`model.hadamard`, `model/hadamard.py`): the fast
transform against Sylvester's matrix built here in numpy, with and without the random signs of
`model.hadamard_seed` (their SHA-256 stream against its spec, rederived here), the rotated model
against the unrotated one in full precision, fake-quant training against packed serving (FFI
and XLA) on random and on trained weights, the settings through configs, run, packed and
ablation folders, and the refusals. (hadamard=0 leaves every computation as it was: the other test files prove that.)

Tolerance of fake-quant against packed: both paths rotate with the same function, on inputs that
agree to float summation order, and an orthonormal H keeps the norm of their difference (random
rounding errors stay spread over the block; only errors aligned with one Walsh function could
gather, by sqrt(block) at most). So near_ties' rule applies unchanged: its noise bounds (measured
on unrotated models, 10x and 20x margins), every larger difference excused only by a code that
flipped at a near-tie. Measured on the random-weight cases below (AMD Zen 3): the XLA path
equals the fake-quant forward bit for bit, rotated or not; the FFI path differs by at most
4e-5 in what the activation quantizers round (1.3e-2 allowed) and 2e-7 of the largest logit
(3e-4 allowed), the same with and without the rotation.
"""

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from near_ties import assert_packed_matches_fake_quant, assert_same_forward, jitted_forward
from tiny_run import RUN

from bitnet_jax import BitNetConfig, BitNetLM, cli, generate, init_params
from bitnet_jax.errors import BitNetError
from bitnet_jax.interop.hf import config_from_hf, config_to_hf
from bitnet_jax.kernels.ops import ServingSpec
from bitnet_jax.model.hadamard import hadamard_signs, hadamard_transform, rotate_input, rotate_kernel
from bitnet_jax.model.serving_layers import serving_variables
from bitnet_jax.research.ablate import parse_grid, plan_runs
from bitnet_jax.serve.load import load_model
from bitnet_jax.serve.pack import pack
from bitnet_jax.serve.packed_folder import load_packed, save_packed
from bitnet_jax.train.run_config import RunConfig, load_run_config
from bitnet_jax.train.run_folder import load_run

# o_proj's input is 4 x 32 = 128 wide, down_proj's 192 = 3 x 64: -1 rotates blocks of 128 and 64.
SMALL = dict(
    vocab_size=300,
    hidden_size=96,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
)
ROTATED = ("o_proj", "down_proj")


def sylvester(n: int) -> np.ndarray:
    """Sylvester's Hadamard matrix of order n (a power of two), entries +-1, float64."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def block_diagonal_h(width: int, block: int) -> np.ndarray:
    """The orthonormal rotation `hadamard_transform` should apply: diag(H_b, ..., H_b) / sqrt(b)."""
    return np.kron(np.eye(width // block), sylvester(block)) / np.sqrt(block)


@pytest.mark.parametrize("block", [1, 2, 4, 8, 32, 128])
def test_transform_is_the_orthonormal_block_diagonal_sylvester_matrix(block):
    h = block_diagonal_h(3 * block, block)
    np.testing.assert_allclose(h @ h.T, np.eye(3 * block), atol=1e-12)  # the reference is orthonormal
    x = np.random.default_rng(block).normal(size=(2, 5, 3 * block)).astype(np.float32)
    y = np.asarray(hadamard_transform(jnp.asarray(x), block))
    np.testing.assert_allclose(y, x.astype(np.float64) @ h, rtol=0, atol=1e-5 * np.abs(x).max())
    # Orthonormal and symmetric: it keeps norms and undoes itself.
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(hadamard_transform(jnp.asarray(y), block)), x, atol=1e-5)
    # O(n log n) adds, no b x b matmul; and bf16 in, bf16 out.
    assert "dot_general" not in str(jax.make_jaxpr(lambda v: hadamard_transform(v, block))(x))
    assert hadamard_transform(jnp.asarray(x, jnp.bfloat16), block).dtype == jnp.bfloat16


def test_gradient_is_the_transposed_transform_and_rotate_kernel_undoes_the_rotation():
    block, width = 16, 48
    h = block_diagonal_h(width, block)
    rng = np.random.default_rng(0)
    x, g = rng.normal(size=(2, 3, width)).astype(np.float32), rng.normal(size=(2, 3, width)).astype(np.float32)
    _, vjp = jax.vjp(lambda v: hadamard_transform(v, block), jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(g))[0]), g @ h.T, atol=1e-5)
    # rotate_kernel is H^T W, on the input axis of a stacked [L, I, O] kernel: (x H)(H^T W) = x W.
    w = rng.normal(size=(2, width, 7)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(rotate_kernel(jnp.asarray(w), block)), h.T @ w, atol=1e-5)
    xw = np.asarray(rotate_input(jnp.asarray(x[0]), block) @ rotate_kernel(jnp.asarray(w[0]), block))
    np.testing.assert_allclose(xw, x[0] @ w[0], atol=1e-4)
    xj = jnp.asarray(x)
    assert rotate_input(xj, 0) is xj  # off: not even a copy


def reference_signs(seed: int, width: int) -> np.ndarray:
    """`hadamard_signs` from its documented spec, bit by bit: input i is negated where bit i (least
    significant first in each byte) of the concatenated SHA-256 digests of
    "bitnet-jax hadamard signs seed=S width=W chunk=C" is 1."""
    signs = []
    for i in range(width):
        chunk, bit = divmod(i, 256)
        digest = hashlib.sha256(f"bitnet-jax hadamard signs seed={seed} width={width} chunk={chunk}".encode()).digest()
        signs.append(-1.0 if digest[bit // 8] >> (bit % 8) & 1 else 1.0)
    return np.array(signs)


def test_signs_are_the_documented_sha256_stream_and_fixed_by_seed_and_width():
    for seed, width in [(0, 64), (3, 192), (12345, 600)]:  # 600: three digests, the last one cut
        signs = hadamard_signs(seed, width)
        assert signs.dtype == np.float32 and signs.shape == (width,) and not signs.flags.writeable
        np.testing.assert_array_equal(signs, reference_signs(seed, width))
        assert abs(signs.mean()) < 4 / np.sqrt(width)  # about as many of each
    # Folders store only the seed: the derivation must never change. Pinned on its first use.
    assert hadamard_signs(0, 64)[:16].astype(int).tolist() == [1, -1, -1, 1, -1, 1, 1, 1, -1, 1, -1, 1, -1, 1, 1, 1]
    np.testing.assert_array_equal(hadamard_signs(7, 128), hadamard_signs(7, 128).copy())  # same seed, same signs
    assert (hadamard_signs(7, 128) != hadamard_signs(8, 128)).sum() > 32  # another seed, other signs
    assert (hadamard_signs(7, 128)[:64] != hadamard_signs(7, 64)).sum() > 16  # per width, not a prefix


def signed_h(width: int, block: int, seed: int) -> np.ndarray:
    """R = D H: the rows of the block-diagonal Sylvester rotation negated by the seed's signs."""
    return np.diag(reference_signs(seed, width)) @ block_diagonal_h(width, block)


@pytest.mark.parametrize("block", [2, 8, 64])
def test_signed_transform_is_sylvester_after_the_signs_and_inverted_by_its_transpose(block):
    width, seed = 3 * block, 11
    r = signed_h(width, block, seed)
    np.testing.assert_allclose(r @ r.T, np.eye(width), atol=1e-12)  # still orthonormal...
    assert not np.allclose(r, r.T)  # ...but not symmetric: no longer its own inverse
    x = np.random.default_rng(block).normal(size=(2, 5, width)).astype(np.float32)
    y = np.asarray(rotate_input(jnp.asarray(x), block, seed))
    np.testing.assert_allclose(y, x.astype(np.float64) @ r, rtol=0, atol=1e-5 * np.abs(x).max())
    np.testing.assert_array_equal(y, np.asarray(hadamard_transform(jnp.asarray(x), block, hadamard_signs(seed, width))))
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    # The inverse is R^T = H D: the plain transform, then the signs; the signed one does not undo itself.
    undone = np.asarray(hadamard_transform(jnp.asarray(y), block)) * hadamard_signs(seed, width)
    np.testing.assert_allclose(undone, x, atol=1e-5)
    assert np.abs(np.asarray(rotate_input(jnp.asarray(y), block, seed)) - x).max() > 0.1
    # Still no matmul, bf16 in and out; and seed None is the unsigned transform, bit for bit.
    assert "dot_general" not in str(jax.make_jaxpr(lambda v: rotate_input(v, block, seed))(x))
    assert rotate_input(jnp.asarray(x, jnp.bfloat16), block, seed).dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(rotate_input(jnp.asarray(x), block, None)), np.asarray(hadamard_transform(jnp.asarray(x), block))
    )


def test_signs_spread_an_input_that_lines_up_with_a_walsh_function():
    """What the signs are for: H maps its own row (a Walsh function, e.g. a channel pattern the
    network learns) onto one channel, an outlier of sqrt(128) x the rms; D H spreads it."""
    walsh = sylvester(128)[5:6].astype(np.float32)

    def peak(y):
        return np.abs(y).max() / np.sqrt(np.mean(np.square(y)))

    assert peak(np.asarray(rotate_input(jnp.asarray(walsh), -1))) == pytest.approx(np.sqrt(128))
    assert peak(np.asarray(rotate_input(jnp.asarray(walsh), -1, 0))) < 4  # measured 2.47


def test_signed_gradient_is_the_transposed_rotation_and_rotate_kernel_undoes_it():
    """JAX transposes the sign multiply with the adds: the backward pass is g R^T = g H D, the
    same as jax.grad of a dense-matrix rotation (no custom gradient assumes R = R^T)."""
    block, width, seed = 16, 48, 4
    r = signed_h(width, block, seed)
    rng = np.random.default_rng(0)
    x, g = rng.normal(size=(2, 3, width)).astype(np.float32), rng.normal(size=(2, 3, width)).astype(np.float32)
    _, vjp = jax.vjp(lambda v: rotate_input(v, block, seed), jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(g))[0]), g @ r.T, atol=1e-5)
    r32 = jnp.asarray(r, jnp.float32)

    def loss(rotate):
        return lambda v: jnp.sum(jnp.sin(rotate(v)) * g)

    got = jax.grad(loss(lambda v: rotate_input(v, block, seed)))(jnp.asarray(x))
    np.testing.assert_allclose(
        np.asarray(got), np.asarray(jax.grad(loss(lambda v: v @ r32))(jnp.asarray(x))), atol=1e-5
    )
    # rotate_kernel is R^T W on the input axis of a stacked [L, I, O] kernel: (x R)(R^T W) = x W.
    w = rng.normal(size=(2, width, 7)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(rotate_kernel(jnp.asarray(w), block, seed)), r.T @ w, atol=1e-5)
    xw = np.asarray(rotate_input(jnp.asarray(x[0]), block, seed) @ rotate_kernel(jnp.asarray(w[0]), block, seed))
    np.testing.assert_allclose(xw, x[0] @ w[0], atol=1e-4)
    xj = jnp.asarray(x)
    assert rotate_input(xj, 0, seed) is xj  # hadamard off: the seed does nothing


def _with_kernels(params, fn):
    """params with fn(kernel) applied to the kernels of o_proj and down_proj only."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: fn(p) if any(getattr(k, "key", None) in ROTATED for k in path) else p, params
    )


@pytest.mark.parametrize("setting, seed", [(-1, None), (32, None), (-1, 7), (32, 0)])
def test_rotated_full_precision_model_is_the_unrotated_model_in_the_rotated_basis(setting, seed):
    """Without quantizers, rotating the inputs of o_proj and down_proj (and no other layer) and
    holding their weights as R^T W computes the unrotated model: the rotation sits where it
    should, on the right axis, with the signs of each projection's width, and changes the basis
    only."""
    plain = BitNetConfig(**SMALL, weight_quant="none", act_quant="none")
    rotated = plain.replace(hadamard=setting, hadamard_seed=seed)
    params = init_params(plain, seed=3)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 300, (2, 9)), jnp.int32)
    want = np.asarray(BitNetLM(plain).apply({"params": params}, ids))
    got = np.asarray(
        BitNetLM(rotated).apply({"params": _with_kernels(params, lambda w: rotate_kernel(w, setting, seed))}, ids)
    )
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    moved = np.asarray(BitNetLM(rotated).apply({"params": params}, ids))  # the same weights, unrotated
    assert np.abs(moved - want).max() > 1e-2 * np.abs(want).max()
    if seed is not None:  # kernels rotated without the signs do not fit the signed inputs
        unsigned = _with_kernels(params, lambda w: rotate_kernel(w, setting))
        moved = np.asarray(BitNetLM(rotated).apply({"params": unsigned}, ids))
        assert np.abs(moved - want).max() > 1e-2 * np.abs(want).max()


def _trained_like(config, seed=0):
    """Random parameters with non-unit norm weights and a spread-out embedding (see test_serving.py:
    unit norm weights line activations up on exact .5 ties)."""
    params = init_params(config, seed)
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: (
            jnp.asarray(rng.uniform(0.5, 1.5, p.shape), p.dtype) if getattr(path[-1], "key", None) == "weight" else p
        ),
        params,
    )
    params["embed_tokens"]["embedding"] = params["embed_tokens"]["embedding"] * 20.0
    return params


def assert_serving_matches_fake_quant(config, params, ids, prompts=None, new_tokens=0):
    """Packed logits on both backends agree with the fake-quant forward (near_ties' rule), and,
    given prompts, greedy tokens are the same on all three paths."""
    packed = pack(config, params, lm_head="float")
    assert_packed_matches_fake_quant(config, params, packed, ids)
    if not prompts:
        return
    fake_quant_ids = generate(config, params, prompts, new_tokens)
    np.testing.assert_array_equal(generate(config, packed, prompts, new_tokens, backend="ffi"), fake_quant_ids)
    np.testing.assert_array_equal(generate(config, packed, prompts, new_tokens, backend="xla"), fake_quant_ids)


@pytest.mark.parametrize(
    "overrides",
    [
        {"hadamard": -1, "act_bits": 4},  # blocks of 128 (o_proj) and 64 (down_proj)
        {"hadamard": 8, "weight_quant": "channel", "tie_word_embeddings": False},
        {"hadamard": -1, "hadamard_seed": 5, "act_bits": 4},  # signs over 128 and 192 inputs
        {"hadamard": 32, "hadamard_seed": 0},  # 8-bit activations, per-tensor weights
    ],
)
def test_packed_serving_equals_fake_quant_on_random_weights(overrides):
    config = BitNetConfig(**{**SMALL, **overrides})
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 300, (2, 21)), jnp.int32)
    assert_serving_matches_fake_quant(config, _trained_like(config), ids)  # greedy: on the trained model below


def test_bad_settings_are_refused():
    for bad in (3, 1, -2, 6):
        with pytest.raises(BitNetError, match=rf"BitNetConfig.hadamard={bad} is invalid: expected 0 \(off\), -1"):
            BitNetConfig(**SMALL, hadamard=bad)
    with pytest.raises(BitNetError, match="hadamard=True is invalid: expected a value of type int"):
        BitNetConfig(**SMALL, hadamard=True)
    # 128 divides o_proj's 128 inputs but not down_proj's 192.
    with pytest.raises(
        BitNetError, match=r"does not divide intermediate_size=192 \(64 is the largest dividing both, and -1 takes"
    ):
        BitNetConfig(**SMALL, hadamard=128)
    with pytest.raises(BitNetError, match="hadamard=-1 is invalid.*intermediate_size=193 is odd"):
        BitNetConfig(**{**SMALL, "intermediate_size": 193}, hadamard=-1)
    with pytest.raises(BitNetError, match=r"hadamard_seed=-1 is invalid: expected None \(no sign flips\) or a non-neg"):
        BitNetConfig(**SMALL, hadamard=-1, hadamard_seed=-1)
    for bad in (True, "3", 1.0):
        with pytest.raises(BitNetError, match=r"hadamard_seed=.* is invalid: expected a value of type int \| None"):
            BitNetConfig(**SMALL, hadamard=-1, hadamard_seed=bad)
    with pytest.raises(BitNetError, match="'hadamard_sed' \\(did you mean 'hadamard_seed'\\?\\)"):
        BitNetConfig.from_dict({**SMALL, "hadamard_sed": 3})
    # Through --set and --grid (the tiny preset: o_proj 256 wide, down_proj 704 = 11 x 64).
    with pytest.raises(BitNetError, match="hadamard=128 is invalid.*does not divide intermediate_size=704"):
        load_run_config(None, ["model.hadamard=128"])
    with pytest.raises(BitNetError, match="hadamard_seed=-2 is invalid"):
        load_run_config(None, ["model.hadamard=-1", "model.hadamard_seed=-2"])
    with pytest.raises(BitNetError, match="'hadamard_seeds' \\(did you mean 'hadamard_seed'\\?\\)"):
        load_run_config(None, ["model.hadamard_seeds=1"])
    base = load_run_config(None, [])
    with pytest.raises(BitNetError, match=r"--grid point \(hadamard=128\): BitNetConfig.hadamard=128 is invalid"):
        plan_runs(base, parse_grid(["hadamard=0,128"]))
    # Formats that cannot say that o_proj and down_proj rotate their inputs.
    config = BitNetConfig(**SMALL, hadamard=-1)
    with pytest.raises(BitNetError, match="hadamard=-1: transformers' BitNet has no online Hadamard transform"):
        config_to_hf(config)
    with pytest.raises(BitNetError, match="hadamard=-1: transformers' BitNet has no online Hadamard transform"):
        config_to_hf(config.replace(hadamard_seed=3))


def test_setting_round_trips_through_configs_and_folders(tmp_path):
    config = BitNetConfig(**SMALL, hadamard=-1)
    assert BitNetConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    run = load_run_config(None, ["model.hadamard=64", "model.act_bits=4"])
    assert (
        run.model.hadamard == 64
        and RunConfig.from_dict(json.loads(json.dumps(run.to_dict())), source="run.json") == run
    )
    # A packed folder keeps it in config.json, and serves with it.
    save_packed(str(tmp_path / "m"), config, pack(config, _trained_like(config)))
    assert json.loads((tmp_path / "m" / "config.json").read_text())["hadamard"] == -1
    loaded, _ = load_packed(str(tmp_path / "m"))
    assert loaded == config
    # A Hugging Face config (which cannot express it) is unrotated.
    assert config_from_hf(config_to_hf(config.replace(hadamard=0))).hadamard == 0
    # Ablations: a grid key, a folder name per setting, and no rotated copy of the baseline.
    base = load_run_config(None, [])
    names = [r.name for r in plan_runs(base, parse_grid(["act_bits=4", "hadamard=0,-1,64"]))]
    assert names == ["w-none_a-none", "w-tensor_a-token-4", "w-tensor_a-token-4_h-max", "w-tensor_a-token-4_h-64"]
    grid = parse_grid(["weight_quant=none", "act_quant=none", "hadamard=0,-1"])
    assert [r.name for r in plan_runs(base, grid)] == ["w-none_a-none"]


@pytest.mark.parametrize("seed", [0, 2**40 + 3])
def test_signs_seed_round_trips_through_configs_and_folders(tmp_path, seed):
    """hadamard_seed travels as hadamard does, and the folder alone reproduces the signs: the
    packed folder serves what the parameters it was packed from compute."""
    config = BitNetConfig(**SMALL, hadamard=-1, hadamard_seed=seed)
    assert config.replace(hadamard_seed=None) == BitNetConfig(**SMALL, hadamard=-1)  # None is the default
    assert BitNetConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    run = load_run_config(None, ["model.hadamard=64", f"model.hadamard_seed={seed}"])
    assert (run.model.hadamard, run.model.hadamard_seed) == (64, seed)
    assert RunConfig.from_dict(json.loads(json.dumps(run.to_dict())), source="run.json") == run
    assert load_run_config(None, ["model.hadamard_seed=None"]).model.hadamard_seed is None
    params = _trained_like(config)
    save_packed(str(tmp_path / "m"), config, pack(config, params, lm_head="float"))
    assert json.loads((tmp_path / "m" / "config.json").read_text())["hadamard_seed"] == seed
    loaded, packed = load_packed(str(tmp_path / "m"))
    assert loaded == config
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 300, (1, 12)), jnp.int32)
    want = jitted_forward(BitNetLM(config), {"params": params}, ids)
    assert_same_forward(
        *want, *jitted_forward(BitNetLM(loaded, ServingSpec("xla", "float", 8)), serving_variables(packed), ids)
    )
    # A folder written before the field existed is unsigned.
    values = json.loads((tmp_path / "m" / "config.json").read_text())
    del values["hadamard_seed"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(values))
    assert load_packed(str(tmp_path / "m"))[0] == config.replace(hadamard_seed=None)


def test_signs_seed_is_a_grid_key():
    """A seed alone names its runs (`_h-max-signs3`), and is dropped where nothing is rotated, so
    that `--set model.hadamard_seed=S --grid hadamard=0,-1` compares plain, and signed, runs."""
    base = load_run_config(None, ["model.act_bits=4", "model.hadamard_seed=3"])
    names = [r.name for r in plan_runs(base, parse_grid(["hadamard=0,-1"]))]
    assert names == ["w-none_a-none", "w-tensor_a-token-4", "w-tensor_a-token-4_h-max-signs3"]
    runs = plan_runs(base, parse_grid(["hadamard=0,-1"]))
    assert [r.run.model.hadamard_seed for r in runs] == [None, None, 3]
    base = load_run_config(None, ["model.act_bits=4", "model.hadamard=-1"])
    names = [r.name for r in plan_runs(base, parse_grid(["hadamard_seed=None,0,1"]))]
    assert names == [
        "w-none_a-none",
        "w-tensor_a-token-4_h-max",
        "w-tensor_a-token-4_h-max-signs0",
        "w-tensor_a-token-4_h-max-signs1",
    ]
    with pytest.raises(
        BitNetError, match=r"--grid point \(hadamard_seed=-1\): BitNetConfig.hadamard_seed=-1 is invalid"
    ):
        plan_runs(base, parse_grid(["hadamard_seed=0,-1"]))


@pytest.fixture(scope="module")
def trained(tiny_env):
    """The tiny run of tiny_run.py with 4-bit activations and Hadamard blocks of -1 (o_proj's 64
    inputs, down_proj's 128: one block each), trained by the CLI, then converted."""
    out = tiny_env["root"] / "h4"
    sets = [f"corpus={tiny_env['corpus']}", *RUN, "model.act_bits=4", "model.hadamard=-1"]
    assert cli.main(["train", "--no-progress", "--out", str(out), *[a for s in sets for a in ("--set", s)]]) == 0
    assert cli.main(["convert", str(out), str(tiny_env["root"] / "h4-packed")]) == 0
    return out, tiny_env["root"] / "h4-packed"


def test_a_trained_rotated_4_bit_model_trains_and_serves_packed(trained, tmp_path, capsys):
    run_dir, packed_dir = trained
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [m["eval_loss"] for m in evals if "eval_loss" in m]
    assert evals[-1] < evals[1] < evals[0], evals  # it learns, even in 6 steps (measured 6.45, 6.11, 6.02)

    run, params, _ = load_run(str(run_dir))
    assert (run.model.hadamard, run.model.act_bits) == (-1, 4)
    config, packed, _ = load_model(str(packed_dir))
    assert config == run.model
    ids = jnp.asarray(np.random.default_rng(2).integers(3, 640, (2, 32)), jnp.int32)
    assert_serving_matches_fake_quant(config, params, ids, [[1, 40, 41, 42], [1, 7]], 16)
    # The converted folder (its default int8 lm_head) gives the ffi and xla backends the same tokens.
    prompts = [[1, 40, 41, 42], [1, 7, 8]]
    np.testing.assert_array_equal(
        generate(config, packed, prompts, 16, backend="ffi"), generate(config, packed, prompts, 16, backend="xla")
    )
    # GGUF cannot hold it: refused before anything is written.
    assert cli.main(["convert", str(run_dir), str(tmp_path / "m.gguf"), "--format", "i2_s"]) == 2
    assert "hadamard=-1; bitnet.cpp and llama.cpp do not rotate" in capsys.readouterr().err
    assert not (tmp_path / "m.gguf").exists()
