"""EleutherAI's lm-evaluation-harness on bitnet-jax models: the lm-eval model `bitnet-jax`.

    bitnet-jax lm-eval --model bitnet-jax --model_args pretrained=runs/tiny --tasks lambada_openai

lm-eval (0.4.x) finds models only in its own registry and reads no plugin entry points, so its
own `lm_eval` command cannot know this one; `bitnet-jax lm-eval ARGS` imports this module (which
registers `bitnet-jax`) and then runs lm-eval's command line on ARGS unchanged. From Python,
import this module and call `lm_eval.simple_evaluate(model="bitnet-jax", ...)`.

model_args: `pretrained` (a run, packed or Hugging Face folder, as `bitnet_jax.load_model` takes),
`max_length` (window W; default: the run's seq_len, else the model's context), `stride` (default
W: lm-eval's own rolling windows, disjoint but the last, which gets a whole window of context),
`backend` ('ffi' / 'xla', for packed models), `max_gen_toks` (default 256), `seed`, `rows` (rows of
W tokens per scoring batch; default `research.eval.Scorer`'s, from the size of the logits).
Scoring packs short requests side by side into rows, so lm-eval's `--batch_size N` sets only the
prompts per `generate` call ('auto': 8).

Scoring is `research.eval.Scorer`'s, so a string's `loglikelihood_rolling` is exactly what
`bitnet-jax eval` scores for it as a document (same prefix token, windows and stride). Requests
longer than W follow lm-eval's convention, left truncation: a loglikelihood request is scored in
one window of its last W tokens, as lm-eval's Hugging Face models do (a continuation longer than
the stride is scored in sliding windows, every token with at least W - stride + 1 tokens before it),
and a `generate_until` prompt keeps its last W - max_gen_toks tokens (a warning says so); asking
for max_gen_toks >= W is an error.
"""

from __future__ import annotations

import json
import logging
import sys

import numpy as np

from bitnet_jax.errors import BitNetError
from bitnet_jax.research.eval import Scorer, default_context, prefix_id
from bitnet_jax.serve.generate import generate
from bitnet_jax.serve.load import load_model

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
except ImportError as e:  # pragma: no cover - the message is the point
    raise BitNetError(
        f"The lm-eval adapter needs lm-evaluation-harness ({e}): pip install 'bitnet-jax[eval]' "
        "(lm-eval and a CPU build of torch, which lm-eval imports)."
    ) from None

log = logging.getLogger(__name__)
_GENERATE_BATCH = 8


def _positive_int_or_none(name: str, value) -> int | None:
    """lm-eval hands model_args over as parsed strings; batch_size may also be 'auto' or 'auto:N'."""
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or (isinstance(value, float) and value != number):
        raise BitNetError(f"lm-eval model_args: {name}={value!r}; expected a positive integer.")
    return number


@register_model("bitnet-jax")
class BitNetJaxLM(TemplateLM):
    """A bitnet-jax model (fake-quant training parameters or packed serving ones) for lm-eval."""

    def __init__(
        self,
        pretrained: str,
        max_length: int | None = None,
        stride: int | None = None,
        backend: str | None = None,
        max_gen_toks: int = 256,
        seed: int = 0,
        rows: int | None = None,
        batch_size=None,
        **_ignored,  # device, max_batch_size, ... that lm-eval passes to every model
    ):
        super().__init__()
        self.pretrained = str(pretrained)
        self.config, self._params, self._tokenizer = load_model(self.pretrained)
        context = _positive_int_or_none("max_length", max_length) or default_context(self.pretrained, self.config)
        self.scorer = Scorer(
            self.config,
            self._params,
            context=context,
            stride=_positive_int_or_none("stride", stride) or context,
            batch_size=_positive_int_or_none("rows", rows),
            backend=backend,
        )
        self.backend_name = backend
        self.max_gen_toks = _positive_int_or_none("max_gen_toks", max_gen_toks)
        self.seed = int(seed)
        self.generate_batch = _positive_int_or_none("batch_size", batch_size) or _GENERATE_BATCH

    # What TemplateLM needs.
    @property
    def eot_token_id(self) -> int:
        return self._tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return prefix_id(self._tokenizer)

    @property
    def max_length(self) -> int:
        return self.scorer.context

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """The string's ids, after the prefix token unless `add_special_tokens` is False."""
        ids = list(self._tokenizer.encode(string))
        return ids if add_special_tokens is False else [self.prefix_token_id, *ids]

    def get_model_info(self) -> dict:
        return {"model": self.pretrained, "max_length": self.scorer.context, "stride": self.scorer.stride}

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context ids, continuation ids) -> (log p, greedy)."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        todo = []
        for i, (_, context_ids, continuation_ids) in enumerate(requests):
            if continuation_ids:
                todo.append(i)
            else:  # nothing to score (an empty continuation)
                results[i] = (0.0, True)
        scored = self.scorer.score(
            [[*requests[i][1], *requests[i][2]] for i in todo], [len(requests[i][1]) for i in todo]
        )
        for i, (logp, greedy) in zip(todo, scored):
            first = len(requests[i][1]) - 1  # target j sits at index j - 1
            results[i] = (float(np.sum(logp[first:])), bool(np.all(greedy[first:])))
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(string | prefix token), every token scored once (sliding windows past W)."""
        encoded = [self.tok_encode(req.args[0]) for req in requests]
        todo = [i for i, ids in enumerate(encoded) if len(ids) > 1]
        scored = self.scorer.score([encoded[i] for i in todo])
        results = [0.0] * len(requests)
        for i, (logp, _) in zip(todo, scored):
            results[i] = float(np.sum(logp))
        for req, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), result)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batched `bitnet_jax.generate` per set of gen_kwargs; the text is cut at the first stop string."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[indices[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=None)
            max_new = int(kwargs.pop("max_gen_toks"))
            room = self.max_length - max_new
            if room < 1:
                raise BitNetError(
                    f"lm-eval asks for {max_new} new tokens, but the model's window is {self.max_length} "
                    "tokens (max_length): ask for fewer (gen_kwargs max_gen_toks) or raise max_length."
                )
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            prompts = []
            for i in indices:
                ids = self.tok_encode(requests[i].args[0])
                if len(ids) > room:
                    log.warning(
                        "A generate_until prompt of %d tokens keeps its last %d (window %d - %d new tokens), "
                        "as lm-eval's own models do.",
                        len(ids),
                        room,
                        self.max_length,
                        max_new,
                    )
                    ids = ids[-room:]
                prompts.append(ids)
            for start in range(0, len(prompts), self.generate_batch):
                batch = prompts[start : start + self.generate_batch]
                # Padded to a fixed batch size, so that one compiled program serves every batch.
                padded = batch + [batch[-1]] * (self.generate_batch - len(batch))
                new_ids = generate(
                    self.config,
                    self._params,
                    padded,
                    max_new,
                    temperature=temperature,
                    top_k=kwargs.get("top_k"),
                    top_p=kwargs.get("top_p"),
                    seed=self.seed,
                    stop_ids=sorted(self._tokenizer.stop_ids),
                    backend=self.backend_name,
                )
                for i, row in zip(indices[start : start + len(batch)], new_ids):
                    stops = np.flatnonzero(np.isin(row, list(self._tokenizer.stop_ids)))
                    row = row[: stops[0]] if len(stops) else row
                    text = postprocess_generated_text(self._tokenizer.decode(row.tolist()), until, None)
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results


def run_lm_eval(argv: list[str]) -> int:
    """lm-eval's command line on `argv`, with the `bitnet-jax` model registered (this module's import)."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
