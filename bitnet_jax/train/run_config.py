"""`RunConfig`: everything a training run needs, loaded from a Python config file plus `--set`.

A config file (e.g. `configs/tiny.py`) defines `get_config() -> dict` with a `model` entry
(a preset name plus BitNetConfig overrides) and training fields at the top level:

    def get_config():
        return {"model": {"preset": "tiny"}, "steps": 300, "batch_size": 16}

`--set key=value` overrides any field after the file is read (`--set steps=50`,
`--set model.weight_quant=channel`); values are Python literals, else strings. Unknown keys and
bad values are refused with a message naming them.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
from typing import Any

from bitnet_jax.data.sources import HELDOUT_FRACTION, DataSource, parse_corpus
from bitnet_jax.errors import BitNetError
from bitnet_jax.model.config import REMAT_POLICIES, BitNetConfig, check_known_keys

COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A training run. Learning-rate fields follow the BitNet b1.58 two-stage recipe: linear
    warmup to `learning_rate`, cosine decay to half of it until `stage2_start` (a fraction of
    `steps`), where the rate drops to `stage2_learning_rate` and decays to `min_learning_rate`;
    weight decay is `weight_decay` in stage one and 0 in stage two."""

    model: BitNetConfig
    # 'stdlib' (the embedded default), a folder of text files, 'jsonl:PATH', 'parquet:PATH',
    # 'array_record:PATH', a dict, or a list of them with weights: see bitnet_jax/data/sources.py.
    corpus: str | tuple = "stdlib"
    corpus_suffixes: tuple[str, ...] = (".py", ".txt", ".md", ".rst")
    tokenizer: str = ""  # a tokenizer.json / tokenizer.model (or its folder); "" trains a sentencepiece
    # A model to start from (a Hugging Face, run or packed folder, or a GGUF file: its weights; the
    # CLI also takes its architecture and tokenizer, see `load_run_config`); "" trains from scratch.
    init: str = ""
    worker_count: int = 0  # grain worker processes preparing batches (0: a thread of this process)
    heldout_fraction: float = HELDOUT_FRACTION
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 300
    warmup_steps: int = 30
    learning_rate: float = 3e-3
    stage2_start: float = 0.5
    stage2_learning_rate: float = 1e-3
    min_learning_rate: float = 1e-4
    weight_decay: float = 0.1
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    grad_clip: float = 1.0
    grad_accum_steps: int = 1  # micro-batches per optimizer step (batch_size is the global batch)
    z_loss: float = 0.0  # weight of mean(logsumexp(logits)^2), which keeps the softmax normalizer near 1
    # Warm start (Nielsen et al. 2025, arXiv 2502.11895): the first floor(quant_start * steps) steps
    # train the model with its quantizers off (full precision, same parameters), the rest are
    # quantization-aware; one compiled step per phase. 0: quantized from the first step.
    quant_start: float = 0.0
    # Knowledge distillation from a teacher: a run, packed or Hugging Face folder or a GGUF file
    # (`bitnet_jax.serve.load.load_training_model`) with this model's vocabulary, any architecture
    # and quantization; "" trains on the data alone. The objective is (1 - kd_weight) * CE +
    # kd_weight * kd_temperature^2 * KL(softmax(teacher / T) || softmax(student / T)) (step.py,
    # `Distillation`); the logged loss stays the cross-entropy.
    teacher: str = ""
    kd_temperature: float = 1.0
    kd_weight: float = 0.5
    # Device mesh (data, fsdp, tensor), see sharding.py; -1 = all devices left over. The default
    # is data parallelism over every device (one device: plain single-device training).
    mesh: tuple[int, int, int] = (-1, 1, 1)
    # "bfloat16": forward and backward in bf16 from f32 master weights and optimizer state
    # (BitLinear kernels are quantized in f32 first); "float32" computes in f32 throughout.
    compute_dtype: str = "float32"
    remat: str = "none"  # recompute decoder layers in the backward pass: 'none', 'full' or a policy name
    # False: the decoder layers unrolled into the step (no loop: faster steps, longer compiles and a
    # higher peak memory; the same parameters). True: one `nn.scan` over the layers.
    scan_layers: bool = True
    seed: int = 0
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep_checkpoints: int = 2  # the newest N checkpoints are kept, older ones deleted
    # Write checkpoints in a background thread while training goes on (orbax async); training
    # waits only for the copy of the arrays to host memory. False: every save blocks until done.
    async_checkpoints: bool = True
    tokenizer_max_bytes: int = 12_000_000

    def __post_init__(self):
        positive = (
            "seq_len",
            "batch_size",
            "steps",
            "grad_accum_steps",
            "log_every",
            "eval_every",
            "eval_batches",
            "checkpoint_every",
            "keep_checkpoints",
            "tokenizer_max_bytes",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _bad(name, value, "a positive integer")
        for name in ("warmup_steps", "seed", "worker_count"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                _bad(name, value, "a non-negative integer")
        for name in (
            "learning_rate",
            "stage2_learning_rate",
            "min_learning_rate",
            "weight_decay",
            "grad_clip",
            "z_loss",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                _bad(name, value, "a non-negative number")
        if (
            isinstance(self.quant_start, bool)
            or not isinstance(self.quant_start, (int, float))
            or not 0 <= self.quant_start < 1
        ):
            _bad(
                "quant_start", self.quant_start, "a fraction of the steps in [0, 1) (0: quantized from the first step)"
            )
        if not isinstance(self.teacher, str):
            _bad(
                "teacher",
                self.teacher,
                "a path to a teacher model (run, packed or Hugging Face folder, GGUF file) or ''",
            )
        if (
            isinstance(self.kd_temperature, bool)
            or not isinstance(self.kd_temperature, (int, float))
            or not self.kd_temperature > 0
        ):
            _bad("kd_temperature", self.kd_temperature, "a positive number (1: the plain softmax)")
        if (
            isinstance(self.kd_weight, bool)
            or not isinstance(self.kd_weight, (int, float))
            or not 0 <= self.kd_weight <= 1
        ):
            _bad("kd_weight", self.kd_weight, "a number in [0, 1] (the distillation term's share of the loss)")
        for name in ("stage2_start", "heldout_fraction", "adam_b1", "adam_b2"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value < 1:
                _bad(name, value, "a number strictly between 0 and 1")
        for name in ("async_checkpoints", "scan_layers"):
            if not isinstance(getattr(self, name), bool):
                _bad(name, getattr(self, name), "True or False")
        if self.compute_dtype not in COMPUTE_DTYPES:
            _bad("compute_dtype", self.compute_dtype, f"one of {COMPUTE_DTYPES}")
        if self.remat not in ("none", "full", *REMAT_POLICIES):
            _bad(
                "remat",
                self.remat,
                f"'none', 'full' (recompute whole layers) or a jax.checkpoint policy: {', '.join(REMAT_POLICIES)}",
            )
        if self.batch_size % self.grad_accum_steps:
            _bad("grad_accum_steps", self.grad_accum_steps, f"a divisor of batch_size={self.batch_size}")
        if self.seq_len > self.model.max_position_embeddings:
            _bad("seq_len", self.seq_len, f"at most model.max_position_embeddings={self.model.max_position_embeddings}")
        try:
            sources = parse_corpus(self.corpus)
        except BitNetError as e:
            raise BitNetError(f"RunConfig.{e}" if str(e).startswith("corpus") else str(e)) from None
        if not isinstance(self.corpus, str):  # lists and dicts: a hashable, normalized form
            object.__setattr__(self, "corpus", sources)
        if not isinstance(self.tokenizer, str):
            _bad("tokenizer", self.tokenizer, "a path to tokenizer.json or tokenizer.model, or '' to train one")
        if isinstance(self.mesh, list):  # from JSON
            object.__setattr__(self, "mesh", tuple(self.mesh))
        if (
            not isinstance(self.mesh, tuple)
            or len(self.mesh) != 3
            or self.mesh.count(-1) > 1
            or not all(isinstance(a, int) and not isinstance(a, bool) and (a >= 1 or a == -1) for a in self.mesh)
        ):
            _bad(
                "mesh",
                self.mesh,
                "three positive integers (data, fsdp, tensor), one of which may be -1 for "
                "'all remaining devices', e.g. (2, 2, 2) or (-1, 1, 1)",
            )
        if isinstance(self.corpus_suffixes, list):
            object.__setattr__(self, "corpus_suffixes", tuple(self.corpus_suffixes))
        if not self.corpus_suffixes or not all(isinstance(s, str) for s in self.corpus_suffixes):
            _bad("corpus_suffixes", self.corpus_suffixes, "a non-empty list of file suffixes such as '.txt'")

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str) -> "RunConfig":
        values = dict(values)
        model = dict(values.pop("model", {}) or {})
        check_known_keys(values, {f.name for f in dataclasses.fields(cls)}, source)
        preset = model.pop("preset", None)
        try:
            model_config = (
                BitNetConfig.preset(preset, **model)
                if preset
                else BitNetConfig.from_dict(model, source=f"{source} [model]")
            )
        except BitNetError as e:
            raise BitNetError(f"{source}: model: {e}") from None
        try:
            return cls(model=model_config, **values)
        except BitNetError as e:
            raise BitNetError(f"{source}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}
        values["corpus_suffixes"] = list(self.corpus_suffixes)
        if not isinstance(self.corpus, str):
            values["corpus"] = [s.to_spec() for s in self.corpus]
        values["mesh"] = list(self.mesh)
        return {"model": self.model.to_dict(), **values}

    @property
    def sources(self) -> tuple[DataSource, ...]:
        """The data sources `corpus` names (one, or a weighted mixture)."""
        return parse_corpus(self.corpus)


def load_run_config(
    path: str | None, overrides: list[str] = (), *, init_model: BitNetConfig | None = None
) -> RunConfig:
    """Reads a config file (`get_config()` returning a dict) and applies `key=value` overrides.

    `init_model`: the architecture of the model a fine-tuning run starts from (`init`). It
    replaces the file's model settings; a `--set model.key=value` that contradicts it is refused
    (the weights fix the architecture and their quantization)."""
    values: dict[str, Any] = {"model": {"preset": "tiny"}}
    source = "defaults"
    if path:
        values, source = _read_config_file(path), path
    values = {**values, "model": dict(values.get("model") or {})}
    model_sets: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise BitNetError(
                f"--set {item!r}: expected key=value, e.g. --set steps=100 or --set model.hidden_size=128."
            )
        value = parse_value(raw)
        if key.startswith("model."):
            model_sets[key[len("model.") :]] = value
        else:
            values[key] = value
    if init_model is None:
        values["model"].update(model_sets)
    else:
        start = init_model.to_dict()
        check_known_keys(model_sets, set(start), "--set", prefix="model.")
        differ = [f"model.{k}={v!r} (the weights have {start[k]!r})" for k, v in model_sets.items() if v != start[k]]
        if differ:
            raise BitNetError(
                f"--set {', '.join(differ)}: a run that starts from {values.get('init') or 'a model'} takes its "
                "architecture and quantization from it. Drop these settings, or train from scratch."
            )
        values["model"] = start
    return RunConfig.from_dict(values, source=f"{source}{' with --set' if overrides else ''}")


def _read_config_file(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise BitNetError(
            f"Run config {path!r} does not exist: expected a Python file defining get_config(), "
            "such as configs/tiny.py."
        )
    spec = importlib.util.spec_from_file_location("_bitnet_run_config", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise BitNetError(f"Run config {path} failed to load: {type(e).__name__}: {e}") from None
    if not callable(getattr(module, "get_config", None)):
        raise BitNetError(f"Run config {path} defines no get_config(): expected `def get_config() -> dict`.")
    values = module.get_config()
    if not isinstance(values, dict):
        raise BitNetError(f"Run config {path}: get_config() returned {type(values).__name__}; expected a dict.")
    return values


def parse_value(raw: str) -> Any:
    """A `--set` / `--grid` value: a Python literal where it parses as one (1, 0.5, None, 'x'), else the string."""
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def _bad(name: str, value: Any, expected: str):
    raise BitNetError(f"RunConfig.{name}={value!r} is invalid: expected {expected}.")
