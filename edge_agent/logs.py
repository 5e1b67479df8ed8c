"""Structured logging set-up shared by every command.

Logs go to standard error, one line per event (console text, or JSON for
production log shippers), so that a command's own output on standard
output (``decode --csv``, ``models evaluate``) stays clean.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

import structlog

#: Environment variables giving the defaults for every command.
LEVEL_ENV = "SAMPLEFLOW_LOG_LEVEL"
FORMAT_ENV = "SAMPLEFLOW_LOG_FORMAT"
LEVELS = ("debug", "info", "warning", "error", "critical")
FORMATS = ("console", "json")


class _CurrentStderr:
    """A file that writes to whatever ``sys.stderr`` is at write time.

    So a test harness (or a daemon) that swaps ``sys.stderr`` after logging
    was configured never leaves the logger holding a closed file.
    """

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(
    level: str | None = None, fmt: str | None = None, stream: TextIO | None = None
) -> None:
    """Configure structlog at ``level`` in format ``fmt``, writing to ``stream``.

    ``level`` and ``fmt`` default to ``$SAMPLEFLOW_LOG_LEVEL`` (``info``) and
    ``$SAMPLEFLOW_LOG_FORMAT`` (``console``); ``stream`` to standard error.
    Raises ``ValueError`` naming the allowed values for a bad level or format.
    """
    level = (level or os.environ.get(LEVEL_ENV) or "info").lower()
    fmt = (fmt or os.environ.get(FORMAT_ENV) or "console").lower()
    if level not in LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(FORMATS)}")
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(stream or _CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
