"""Tests for the shared structured-logging set-up."""

from __future__ import annotations

import io
import json

import pytest
import structlog

from edge_agent import cli
from edge_agent.logs import configure_logging


def test_json_lines_go_to_the_given_stream_at_the_level() -> None:
    """An INFO event is one JSON line on the stream; DEBUG is filtered."""
    stream = io.StringIO()
    configure_logging("info", "json", stream)
    log = structlog.get_logger("t")
    log.debug("hidden", a=1)
    log.info("batch_shipped", records=3)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["event"] == "batch_shipped"
    assert event["records"] == 3
    assert event["level"] == "info"


def test_bad_level_names_the_allowed_values() -> None:
    """A bad level is refused with the allowed values in the message."""
    with pytest.raises(ValueError, match="debug, info, warning"):
        configure_logging("loud", "json", io.StringIO())


def test_decode_command_keeps_stdout_clean(capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI logs to stderr: a warning logged by a command is not on stdout."""
    configure_logging("info", "console")
    assert cli.main(["decode", "/nonexistent.pcap", "--csv"]) != 0
    structlog.get_logger("t").warning("pending_full", exporter="x")
    out = capsys.readouterr()
    assert "pending_full" not in out.out
    assert "pending_full" in out.err
