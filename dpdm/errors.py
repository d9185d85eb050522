"""The one exception type of user-facing errors."""


class DPDMError(RuntimeError):
    """A user-facing error: the message names the problem and the fix (the CLI prints it
    in one line and exits 2)."""
