"""User-facing errors.

Anything a user can cause (a bad path, a bad config value, a prompt that does not fit) raises
`BitNetError` with a message that says what was expected, what was found and what to do. The CLI
prints these messages without a traceback; everything else is a bug and keeps its traceback.
"""

import difflib


class BitNetError(ValueError):
    """An error caused by the user's input, with a message meant to be read by a person."""


def did_you_mean(word, choices, prefix: str = "") -> str:
    """' (did you mean 'x'?)' naming the choice closest to `word` (written with `prefix`, e.g.
    'model.'), or '' if none is close: the hint every "unknown name" message appends."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" (did you mean {prefix + close[0]!r}?)" if close else ""
