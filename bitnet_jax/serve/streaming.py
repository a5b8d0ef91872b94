"""Streaming decode: token ids as they are generated -> text increments.

Byte fallback and multi-byte UTF-8 make per-token decoding wrong for streamed output; a
`StreamDecoder` yields only completed text (`generate --verbose`, `chat`, the HTTP server).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from bitnet_jax.data.tokenizer import Tokenizer


class StreamDecoder:
    """Turns a growing sequence of token ids into text increments, for printing as generated.

    Decoding token by token is wrong: a character can span several byte-fallback tokens, and
    some tokenizers drop the leading space of the first token of a decode. So each `push`
    re-decodes a short window starting at the last emitted boundary, and holds text back while
    it ends in an incomplete UTF-8 sequence (U+FFFD). `"".join(pushes) + flush()` equals
    `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # decode from here, so the window starts like the full decode does
        self._read = 0  # ids before this index have been emitted

    def push(self, ids: int | Sequence[int]) -> str:
        """Adds one id or several; returns the newly completed text (possibly "")."""
        self._ids.extend([int(ids)] if np.ndim(ids) == 0 else [int(i) for i in ids])
        return self._emit(final=False)

    def flush(self) -> str:
        """Returns whatever is held back (e.g. an incomplete character at the end)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        decode = self._tokenizer.decode
        emitted = decode(self._ids[self._prefix : self._read])
        text = decode(self._ids[self._prefix :])
        if len(text) > len(emitted) and (final or not text.endswith("\ufffd")):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(emitted) :]
        if final:
            self._prefix = self._read = len(self._ids)
        return ""
