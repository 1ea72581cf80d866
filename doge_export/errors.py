"""The one exception type for user errors (STYLE habit 10).

Raise DogeExportError with what was got, what was expected and what to do; the CLI prints the
message and exits 1 without a traceback. Internal invariants stay `assert`.
"""


class DogeExportError(Exception):
    """A user-facing error: bad input, missing file, unsupported checkpoint, failed check."""
