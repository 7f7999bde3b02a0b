"""Errors a user can cause.

Every problem that comes from the user's input (a path, a name, a file, a
number) is raised as `SlimkitError` with a one-line message that says what is
wrong and how to fix it. The CLI prints it without a traceback and exits 2;
anything else is a bug and keeps its traceback.
"""


class SlimkitError(Exception):
    """A user-facing error: one line, naming the fix."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def short_reason(exc: BaseException, limit: int = 160) -> str:
    """First line of an exception's message, trimmed, for embedding in our own."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
