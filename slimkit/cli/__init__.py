"""The `slimkit` command line: a thin shell over the library, one public call per command.

Errors a user can cause print one line and exit 2; `slimkit --debug ...`
shows the traceback instead. Short flags mean one thing everywhere: `-m` the
method, `-o` a method option (KEY=VALUE), `-r` the reference model, `-f` the
export format, `-p` the prompt.
"""

from __future__ import annotations

from slimkit.cli import (
    compress,  # noqa: F401  (registers its commands)
    measure,  # noqa: F401, I001  (registers its commands first: they lead the help)
)
from slimkit.cli.base import app


def main() -> None:
    app()
