"""Evaluation of a finished model: cross-entropy, perplexity and bits per byte on a corpus.

`bitnet-jax eval --model SRC [--corpus SPEC]` scores every document of a corpus (default: the
held-out split of a run folder's own corpus, the very documents training evaluates on) and
reports, over all scored tokens,
  cross-entropy   total negative log-likelihood / scored tokens (nats/token),
  perplexity      exp(cross-entropy),
  bits per byte   total NLL in bits / UTF-8 bytes of the scored text: a per-character measure that
                  does not depend on the tokenizer, so that models with different vocabularies compare.

Scoring convention (lm-evaluation-harness's `loglikelihood_rolling`): a document x_1 .. x_n is
scored as sum_j log p(x_j | p, x_<j), where p is one prefix token (the tokenizer's BOS, as
`bitnet-jax generate` starts prompts) that is context only; the end of the document is not
scored. Documents are scored independently of one another. A conversation of a `chat:` source
(`ChatDocument`) is scored as training scores it: only its assistant tokens (the loss mask), each
given the conversation before it, which starts with the template's BOS; bits per byte count the
bytes of those tokens alone.

Sliding windows: the model sees at most `context` (W) tokens at once. A sequence longer than that
is scored in windows of W tokens that advance by `stride` (S) tokens; each window scores only the
tokens no earlier window scored, so every token is scored once, with at least min(j, W - S + 1)
tokens of context (j: its index; all of them where j <= W). S = 1 gives every token the whole
window; S = W, disjoint windows (lm-eval's rolling windows).

Batching: windows shorter than W (short documents, lm-eval requests) are packed side by side
into rows of W tokens, kept apart by segment ids, with RoPE positions that restart at 0 in each
window; B rows form one batch of fixed shape [B, W], so the scoring compiles once per model,
W and B. (A model with per-tensor activation scales, `act_quant="tensor"`, takes one absmax over
the whole batch, padding and neighbouring windows included, in training as here: its numbers
depend on the batching. Per-token scales, the default, do not.)

Axis letters: B rows of a batch, W positions in a row, V vocabulary.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import json
import math
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax.data import documents
from bitnet_jax.data import pipeline as data
from bitnet_jax.data.sources import parse_corpus
from bitnet_jax.errors import BitNetError
from bitnet_jax.model.config import BitNetConfig
from bitnet_jax.model.serving_layers import serving_variables
from bitnet_jax.model.transformer import BitNetLM
from bitnet_jax.serve.generate import serving_params
from bitnet_jax.serve.load import load_model
from bitnet_jax.train.corpus import prepare_corpus
from bitnet_jax.train.run_config import RunConfig
from bitnet_jax.train.run_folder import default_cache_dir, is_run_folder, read_run_file

# Default rows per batch: as many as keep the f32 logits of a batch [B, W, V] within this many
# bytes (2B4T at W = 4096: one row, 2.1 GB), at most _MAX_ROWS.
_LOGITS_BYTES = 1 << 30
_MAX_ROWS = 16


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Totals over the scored documents; the metrics are properties."""

    documents: int
    tokens: int  # scored tokens
    bytes: int  # UTF-8 bytes of the text those tokens spell
    nll: float  # total negative log-likelihood, nats

    @property
    def cross_entropy(self) -> float:
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.cross_entropy)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes

    def to_dict(self) -> dict:
        return {
            **dataclasses.asdict(self),
            "cross_entropy": self.cross_entropy,
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
        }


@dataclasses.dataclass(frozen=True)
class ChatDocument:
    """A conversation of a chat source: its token ids (from the template's BOS) and its loss mask;
    the tokens the mask marks (the assistant's) are scored, the others are context only."""

    ids: np.ndarray  # [n] int32
    loss_mask: np.ndarray  # [n] bool


def document_ids(doc: np.ndarray | ChatDocument) -> np.ndarray:
    """A document's token ids, whichever kind it is."""
    return doc.ids if isinstance(doc, ChatDocument) else doc


@dataclasses.dataclass(frozen=True)
class _Window:
    """Inputs seq[start:end], targets seq[start + 1:end + 1]; scores the targets after `scored_from`."""

    seq: int
    start: int
    scored_from: int  # targets j with scored_from < j <= end are scored
    end: int


class Scorer:
    """Log-probabilities of token sequences under one model, in sliding windows (see the module doc).

    `params` are training parameters (the fake-quant forward, `BitNetLM(config).apply`) or packed
    ones (`bitnet_jax.pack`: the serving forward, FFI kernels on CPU unless `backend='xla'`).
    """

    def __init__(
        self,
        config: BitNetConfig,
        params,
        *,
        context: int | None = None,
        stride: int | None = None,
        batch_size: int | None = None,
        backend: str | None = None,
    ):
        self.config = config
        self.params, self.serving = serving_params(config, params, backend)
        self.context = config.max_position_embeddings if context is None else context
        if not isinstance(self.context, int) or not 2 <= self.context <= config.max_position_embeddings:
            raise BitNetError(
                f"context={self.context!r}: expected an integer in [2, {config.max_position_embeddings}] "
                "(the model's max_position_embeddings)."
            )
        self.stride = max(self.context // 2, 1) if stride is None else stride
        if not isinstance(self.stride, int) or not 1 <= self.stride <= self.context:
            raise BitNetError(f"stride={self.stride!r}: expected an integer in [1, context={self.context}].")
        default_rows = _LOGITS_BYTES // (4 * self.context * config.vocab_size)
        self.batch_size = min(max(default_rows, 1), _MAX_ROWS) if batch_size is None else batch_size
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise BitNetError(f"batch_size={self.batch_size!r}: expected a positive integer (rows per batch).")

    def score(
        self, sequences: Sequence[Sequence[int]], first_targets: Sequence[int] | None = None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each sequence x_0 .. x_{n-1}, (log p(x_j | x_<j), x_j is the argmax) for j = 1 .. n-1:
        float64 [n - 1] and bool [n - 1]. Targets before `first_targets[i]` (default 1) are context
        only: NaN and False there."""
        seqs = [np.asarray(s, np.int32) for s in sequences]
        firsts = [1] * len(seqs) if first_targets is None else [int(f) for f in first_targets]
        for i, (seq, first) in enumerate(zip(seqs, firsts)):
            if seq.ndim != 1 or not 1 <= first <= len(seq) - 1:
                raise BitNetError(
                    f"sequence {i}: expected at least two tokens and a first scored token in [1, {len(seq) - 1}]; "
                    f"found {len(seq)} tokens, first scored token {first}."
                )
            if seq.min() < 0 or seq.max() >= self.config.vocab_size:
                raise BitNetError(
                    f"sequence {i} has token ids outside the vocabulary [0, {self.config.vocab_size}): "
                    "was it encoded with this model's tokenizer?"
                )
        logp = [np.full(len(s) - 1, np.nan) for s in seqs]
        greedy = [np.zeros(len(s) - 1, bool) for s in seqs]
        rows = _pack_rows(
            [w for i, (s, f) in enumerate(zip(seqs, firsts)) for w in self.windows(i, len(s), f)], self.context
        )
        for b in range(0, len(rows), self.batch_size):
            batch = rows[b : b + self.batch_size]
            arrays = _batch_arrays(batch, seqs, self.batch_size, self.context)
            logp_bw, greedy_bw = _score_rows(self.params, *arrays, config=self.config, serving=self.serving)
            logp_bw, greedy_bw = np.asarray(logp_bw, np.float64), np.asarray(greedy_bw)
            for r, row in enumerate(batch):
                offset = 0
                for w in row:
                    slots = slice(offset + w.scored_from - w.start, offset + w.end - w.start)
                    targets = slice(w.scored_from, w.end)  # target j sits at index j - 1
                    logp[w.seq][targets] = logp_bw[r, slots]
                    greedy[w.seq][targets] = greedy_bw[r, slots]
                    offset += w.end - w.start
        return list(zip(logp, greedy))

    def windows(self, seq: int, n: int, first: int) -> list[_Window]:
        """The windows that score targets first .. n-1 of a sequence of n tokens."""
        w, s = self.context, self.stride
        out, done = [], first - 1  # targets up to `done` are scored (or context only)
        while done < n - 1:
            # The first window reaches as far as it can with all of its targets' context in it.
            end = min(n - 1, max(w, done + s) if not out else done + s)
            out.append(_Window(seq, max(0, end - w), done, end))
            done = end
        return out


def _pack_rows(windows: list[_Window], width: int) -> list[list[_Window]]:
    """Windows, in order, side by side in rows of `width` tokens (a new row when one does not fit)."""
    rows, used = [], width
    for w in windows:
        length = w.end - w.start
        if used + length > width:
            rows.append([])
            used = 0
        rows[-1].append(w)
        used += length
    return rows


def _batch_arrays(rows: list[list[_Window]], seqs: list[np.ndarray], batch_size: int, width: int):
    """inputs, targets, positions, segment ids: int32 [B, W]; pad slots and rows are segment 0."""
    inputs_bw, targets_bw, positions_bw, segments_bw = (np.zeros((batch_size, width), np.int32) for _ in range(4))
    for r, row in enumerate(rows):
        offset = 0
        for k, w in enumerate(row, 1):
            length = w.end - w.start
            here = slice(offset, offset + length)
            inputs_bw[r, here] = seqs[w.seq][w.start : w.end]
            targets_bw[r, here] = seqs[w.seq][w.start + 1 : w.end + 1]
            positions_bw[r, here] = np.arange(length)
            segments_bw[r, here] = k
            offset += length
    return inputs_bw, targets_bw, positions_bw, segments_bw


@functools.partial(jax.jit, static_argnames=("config", "serving"))
def _score_rows(params, inputs_bw, targets_bw, positions_bw, segments_bw, *, config, serving):
    """(log p(target), target is the argmax): f32 [B, W], bool [B, W]."""
    variables = serving_variables(params) if serving is not None else {"params": params}
    logits_bwv = BitNetLM(config, serving).apply(
        variables, inputs_bw, positions_bt=positions_bw, segment_ids_bt=segments_bw
    )
    logp_bwv = jax.nn.log_softmax(logits_bwv.astype(jnp.float32), axis=-1)
    logp_bw = jnp.take_along_axis(logp_bwv, targets_bw[..., None], axis=-1)[..., 0]
    return logp_bw, jnp.argmax(logits_bwv, axis=-1) == targets_bw


# Corpora.
def parse_corpus_arg(text: str):
    """A `--corpus` value: a Python literal (a dict or a list of sources), else a source string."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return value if isinstance(value, (dict, list, tuple)) else text


def corpus_documents(
    model_path: str, tokenizer, corpus=None, cache_dir: str | None = None
) -> tuple[str, list[np.ndarray]]:
    """(a description, the token ids of every document) of the evaluation corpus.

    `corpus` None: the held-out split of the run folder's own corpus, as training makes it
    (`prepare_corpus`: the same sources, split and tokenization). Otherwise any corpus spec a run
    config takes (a mixture is scored whole, its weights ignored), all of its documents, tokenized
    with the model's tokenizer.
    """
    cache_dir = cache_dir or default_cache_dir()
    if corpus is None:
        if not is_run_folder(model_path):
            raise BitNetError(
                f"{model_path} is not a run folder, so it has no corpus of its own: pass --corpus, e.g. "
                "--corpus jsonl:/data/valid.jsonl or a folder of text files."
            )
        run = read_run_file(model_path)
        stream = prepare_corpus(run, model_path, cache_dir).eval_tokens
        what = f"the held-out split ({run.heldout_fraction:.0%}) of {', '.join(s.name for s in run.sources)}"
    else:
        sources = parse_corpus(corpus)
        suffixes = next(f.default for f in dataclasses.fields(RunConfig) if f.name == "corpus_suffixes")
        # heldout_fraction 0: every document on the "train" side.
        streams = [
            documents.source_streams(
                s, tokenizer, default_suffixes=suffixes, heldout_fraction=0.0, cache_dir=cache_dir
            )[0]
            for s in sources
        ]
        stream = data.concat_streams(streams, tokenizer.eos_id)
        what = ", ".join(s.name for s in sources)
    docs = split_documents(stream, tokenizer.eos_id)
    if not docs:
        raise BitNetError(
            f"The evaluation corpus ({what}) holds no text to score. Point --corpus at documents with text"
            + (" (a run's held-out split is empty when its corpus has a single document)." if corpus is None else ".")
        )
    return what, docs


def split_documents(stream, eos_id: int) -> list[np.ndarray | ChatDocument]:
    """The non-empty documents of a token stream `doc EOS doc EOS ...` (pipeline.py's format).

    A `MaskedStream` (chat sources) splits at its DOC_END flags (a conversation may hold the EOS
    id) and gives `ChatDocument`s, except for documents whose every token is a target: those are
    the plain-text documents of a mixed corpus (a conversation starts with BOS, never a target)."""
    if not isinstance(stream, data.MaskedStream):
        stream_n = np.asarray(stream)
        ends = np.flatnonzero(stream_n == eos_id)
    else:
        stream_n, flags_n = np.asarray(stream.tokens), np.asarray(stream.flags)
        ends = np.flatnonzero(flags_n & data.DOC_END)
    starts = np.concatenate([[0], ends + 1])
    ends = np.concatenate([ends, [len(stream_n)]])
    docs = []
    for a, b in zip(starts, ends):
        if b <= a:
            continue
        ids = stream_n[a:b].astype(np.int32)
        loss = None if not isinstance(stream, data.MaskedStream) else (flags_n[a:b] & data.LOSS) != 0
        docs.append(ids if loss is None or loss.all() else ChatDocument(ids, loss))
    return docs


def evaluate(
    scorer: Scorer, tokenizer, docs: Sequence[np.ndarray | ChatDocument], *, max_tokens: int | None = None
) -> EvalResult:
    """Scores documents (token ids, no BOS / EOS; or `ChatDocument`s) as the module doc says; at
    most `max_tokens` scored tokens, taking documents in order and cutting the last one short."""
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise BitNetError(f"max_tokens={max_tokens!r}: expected a positive integer.")
    budget = math.inf if max_tokens is None else max_tokens
    prefix = prefix_id(tokenizer)
    seqs, scored = [], []  # each sequence [n], and which of its targets 1 .. n-1 are scored: bool [n - 1]
    for doc in docs:
        if budget <= 0:
            break
        if isinstance(doc, ChatDocument):
            seq, mask = np.asarray(doc.ids, np.int32), np.asarray(doc.loss_mask[1:], bool)
        else:
            seq = np.concatenate([[prefix], np.asarray(doc, np.int32)]).astype(np.int32)
            mask = np.ones(len(doc), bool)
        if mask.sum() > budget:  # cut just after the budget-th scored target
            last = int(np.flatnonzero(mask)[int(budget) - 1])
            seq, mask = seq[: last + 2], mask[: last + 1]
        budget -= int(mask.sum())
        if mask.any():
            seqs.append(seq)
            scored.append(mask)
    if not seqs:
        raise BitNetError("No tokens to score: the documents are empty.")
    results = scorer.score(seqs)
    nll = -sum(float(np.sum(logp[mask])) for (logp, _), mask in zip(results, scored))
    n_bytes = sum(_scored_bytes(tokenizer, seq, mask) for seq, mask in zip(seqs, scored))
    if n_bytes == 0:
        raise BitNetError("The scored tokens spell no text (0 bytes): bits per byte is undefined.")
    return EvalResult(documents=len(seqs), tokens=int(sum(m.sum() for m in scored)), bytes=n_bytes, nll=nll)


def _scored_bytes(tokenizer, seq: np.ndarray, mask: np.ndarray) -> int:
    """UTF-8 bytes of the text the scored targets spell, each run of consecutive ones decoded whole."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    runs = zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1))
    return sum(len(tokenizer.decode(seq[1 + a : 1 + b].tolist()).encode("utf-8")) for a, b in runs)


def prefix_id(tokenizer) -> int:
    """The context-only token a document or an lm-eval request starts from: BOS, else EOS."""
    return tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id


def default_context(model_path: str, config: BitNetConfig) -> int:
    """A run's training sequence length (the positions its model has seen), else the model's context."""
    if is_run_folder(model_path):
        return min(read_run_file(model_path).seq_len, config.max_position_embeddings)
    return config.max_position_embeddings


def eval_command(
    model: str,
    corpus=None,
    *,
    max_tokens: int | None = None,
    context: int | None = None,
    stride: int | None = None,
    batch_size: int | None = None,
    backend: str | None = None,
    json_path: str | None = None,
) -> dict:
    """`bitnet-jax eval`: loads the model, scores the corpus, prints a summary; returns the report."""
    config, params, tokenizer = load_model(model)
    what, docs = corpus_documents(model, tokenizer, corpus)
    scorer = Scorer(
        config,
        params,
        context=default_context(model, config) if context is None else context,
        stride=stride,
        batch_size=batch_size,
        backend=backend,
    )
    start = time.perf_counter()
    result = evaluate(scorer, tokenizer, docs, max_tokens=max_tokens)
    seconds = time.perf_counter() - start
    report = {
        "model": model,
        "corpus": what,
        "forward": "fake-quant (training parameters)"
        if scorer.serving is None
        else f"packed ({scorer.serving.backend})",
        "context": scorer.context,
        "stride": scorer.stride,
        **result.to_dict(),
        "seconds": seconds,
    }
    print(
        f"{model} on {what}: {result.documents} documents, {result.tokens} tokens, {result.bytes} bytes "
        f"(context {scorer.context}, stride {scorer.stride}, {report['forward']})\n"
        f"cross-entropy {result.cross_entropy:.4f} nats/token, perplexity {result.perplexity:.3f}, "
        f"bits per byte {result.bits_per_byte:.4f}  [{seconds:.1f} s, compilation included]"
    )
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
    return report
