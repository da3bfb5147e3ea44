"""What every `python -m train.*` command that does long work does around it: log lines with
the time of day, and an expected failure (a missing data set, a bad label file, a wrong card)
reported as one line on stderr with exit status 2, never a traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

__all__ = ["EXIT_ERROR", "report_errors", "setup_logging"]

EXIT_ERROR = 2  # an expected, actionable failure


def setup_logging(level: int = logging.INFO) -> None:
    """Log records as ``HH:MM:SS name: message`` on stderr."""
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def report_errors(work: Callable[[], object], errors: tuple[type[BaseException], ...]) -> int:
    """Run `work`: the exit status it returns when that is an int, else 0 (a command's result,
    a report say, is not a status), or :data:`EXIT_ERROR` after printing ``error: <message>`` to
    stderr when it raises one of `errors`. Any other exception is a bug and keeps its traceback."""
    try:
        status = work()
    except errors as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR
    return status if isinstance(status, int) and not isinstance(status, bool) else 0
