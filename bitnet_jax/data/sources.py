"""Data sources of a run: what the `corpus` field of a run config names, parsed and validated.

`corpus` is one source or a list of them (a weighted mixture). A source is a string or a dict:

    "stdlib"                               the embedded default: this Python's standard library
    "/data/texts"                          a folder of text files (as before: any existing folder)
    "text:/data/texts"                     the same, explicitly
    "jsonl:/data/train.jsonl"              JSON Lines, one document per line in the field "text"
    "parquet:/data/shards/"                Parquet files (a file, a folder or a glob), column "text"
    "array_record:/data/tok"               documents pre-tokenized by `bitnet-jax tokenize`
    "chat:/data/sft.jsonl"                 conversations {"messages": [...]}, one per line (a file,
                                           a folder or a glob), rendered by the chat template
    {"kind": "jsonl", "path": "/data/*.jsonl", "field": "content", "weight": 0.7}
    {"kind": "parquet", "path": "/data/wiki", "column": "text", "weight": 0.3}
    {"kind": "text", "path": "/data/code", "suffixes": [".py"], "weight": 1}
    {"kind": "chat", "path": "/data/sft/*.jsonl", "weight": 0.5}

Weights are relative (0.7 / 0.3 and 7 / 3 mix the same way) and only matter in a list. This
module only parses; `documents.py` reads the data (so a run config can be loaded, e.g. to serve a
model, on a machine without the data).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

from bitnet_jax.errors import BitNetError, did_you_mean

# The fraction of documents (or files) held out for evaluation, unless a run config says otherwise.
# (Here, not in pipeline.py, so that reading a run config does not import grain.)
HELDOUT_FRACTION = 0.02

KINDS = ("stdlib", "text", "jsonl", "parquet", "array_record", "chat")
# The dict keys each kind takes besides "kind" and "weight"; "column" is parquet's name for "field".
_KEYS = {
    "stdlib": (),
    "text": ("path", "suffixes"),
    "jsonl": ("path", "field"),
    "parquet": ("path", "column"),
    "array_record": ("path",),
    "chat": ("path",),
}
_PREFIX = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*):(?!//)(.*)$")  # "kind:path", not "s3://..."


@dataclasses.dataclass(frozen=True)
class DataSource:
    """One source of documents. `field` is the JSON field (jsonl) or the column (parquet)."""

    kind: str
    path: str = ""
    field: str = "text"
    suffixes: tuple[str, ...] = ()  # text folders; () means RunConfig.corpus_suffixes
    weight: float = 1.0

    @property
    def name(self) -> str:
        """How messages name the source: `jsonl:/data/train.jsonl`."""
        return self.kind if self.kind == "stdlib" else f"{self.kind}:{self.path}"

    def to_spec(self) -> str | dict[str, Any]:
        """The compact string where it says everything, else the dict form (for run.json)."""
        if self.weight == 1.0 and self.field == "text" and not self.suffixes:
            return self.name
        spec: dict[str, Any] = {"kind": self.kind}
        if self.kind != "stdlib":
            spec["path"] = self.path
        if self.kind == "jsonl":
            spec["field"] = self.field
        if self.kind == "parquet":
            spec["column"] = self.field
        if self.suffixes:
            spec["suffixes"] = list(self.suffixes)
        spec["weight"] = self.weight
        return spec


def parse_corpus(corpus: Any) -> tuple[DataSource, ...]:
    """The sources of a `corpus` value (a string, a dict, or a non-empty list of them)."""
    if isinstance(corpus, (str, dict)):
        return (parse_source(corpus),)
    if isinstance(corpus, (list, tuple)) and corpus:
        sources = tuple(parse_source(item, where=f"corpus[{i}]") for i, item in enumerate(corpus))
        total = sum(s.weight for s in sources)
        if not total > 0:
            raise BitNetError(
                f"corpus: the mixture weights {[s.weight for s in sources]} sum to {total}; "
                "expected positive weights, e.g. 0.7 and 0.3."
            )
        return sources
    raise BitNetError(
        f"corpus={corpus!r} is invalid: expected a source ('stdlib', a folder, 'jsonl:PATH', 'parquet:PATH', "
        "'array_record:PATH', 'chat:PATH', or a dict with 'kind' and 'path') or a non-empty list of them."
    )


def parse_source(spec: Any, where: str = "corpus") -> DataSource:
    """One source from its string or dict form; errors name `where` and the bad part."""
    if isinstance(spec, DataSource):
        return spec
    if isinstance(spec, str):
        return _parse_string(spec, where)
    if not isinstance(spec, dict):
        raise BitNetError(
            f"{where}={spec!r} is invalid: expected a string such as 'jsonl:/data/train.jsonl' "
            "or a dict such as {'kind': 'jsonl', 'path': ..., 'field': 'text', 'weight': 1}."
        )
    values = dict(spec)
    kind = _check_kind(values.pop("kind", None), where)
    known = {"kind", "weight", *_KEYS[kind]}
    unknown = sorted(set(spec) - known)
    if unknown:
        hints = []
        for key in unknown:
            hints.append(f"{key!r}" + did_you_mean(key, known))
        raise BitNetError(
            f"{where}: unknown key(s) {', '.join(hints)} for a {kind!r} source; it takes {', '.join(sorted(known))}."
        )
    weight = values.pop("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise BitNetError(
            f"{where}: weight={weight!r} is invalid: expected a positive number (weights are relative; "
            "leave a source out instead of giving it weight 0)."
        )
    path = values.pop("path", "")
    if kind != "stdlib" and (not isinstance(path, str) or not path):
        raise BitNetError(f"{where}: a {kind!r} source needs a 'path' (a non-empty string); found {path!r}.")
    field = values.pop("field", values.pop("column", "text"))
    if not isinstance(field, str) or not field:
        key = "column" if kind == "parquet" else "field"
        raise BitNetError(
            f"{where}: {key}={field!r} is invalid: expected the non-empty name of the "
            f"{'column' if kind == 'parquet' else 'JSON field'} that holds the text."
        )
    suffixes = values.pop("suffixes", ())
    if (
        isinstance(suffixes, str)
        or not isinstance(suffixes, (list, tuple))
        or not all(isinstance(s, str) and s for s in suffixes)
    ):
        raise BitNetError(
            f"{where}: suffixes={suffixes!r} is invalid: expected a list of file suffixes such as ['.py', '.txt']."
        )
    return DataSource(kind=kind, path=path, field=field, suffixes=tuple(suffixes), weight=float(weight))


def _parse_string(spec: str, where: str) -> DataSource:
    if not spec:
        raise BitNetError(f"{where}='' is invalid: expected 'stdlib', a folder or 'KIND:PATH'.")
    if spec == "stdlib":
        return DataSource("stdlib")
    match = _PREFIX.match(spec)
    # A bare existing path stays a text folder even if it contains a colon.
    if match and not os.path.exists(spec):
        kind, path = match.groups()
        kind = _check_kind(kind, where)
        if kind == "stdlib" or not path:
            raise BitNetError(f"{where}={spec!r} is invalid: expected 'stdlib' alone or '{kind}:PATH' with a path.")
        return DataSource(kind, path)
    return DataSource("text", spec)


def _check_kind(kind: Any, where: str) -> str:
    if kind in KINDS:
        return kind
    hint = did_you_mean(kind, KINDS)
    raise BitNetError(f"{where}: unknown source kind {kind!r}{hint}; expected one of {', '.join(KINDS)}.")
