"""User-facing errors.

Anything a user can cause (a bad path, a bad config value, a prompt that does not fit) raises
`BitNetError` with a message that says what was expected, what was found and what to do. The CLI
prints these messages without a traceback; everything else is a bug and keeps its traceback.
"""


class BitNetError(ValueError):
    """An error caused by the user's input, with a message meant to be read by a person."""
