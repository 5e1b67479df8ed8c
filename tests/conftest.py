"""Shared test helpers: where the shared captures and datasets live.

Tests that need ``../shared`` (next to the project root) take the
``shared_dir`` or ``captures_dir`` fixture.  When the folder is missing
they FAIL, so a CI run without the data cannot pass silently; set
``SAMPLEFLOW_ALLOW_NO_SHARED=1`` to skip them instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

# Real local servers (MiniStack) for integration tests, as fixtures.
from tests.mongo_server import mongo_server
from tests.servers import kinesis_stream, ministack

__all__ = ["kinesis_stream", "ministack", "mongo_server"]

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = PROJECT_ROOT.parent / "shared"


def require_shared(*parts: str) -> Path:
    """Return ``SHARED_DIR / parts``; fail (or skip, if allowed) if absent."""
    path = SHARED_DIR.joinpath(*parts)
    if not path.exists():
        message = (
            f"shared test data {path} is missing "
            "(set SAMPLEFLOW_ALLOW_NO_SHARED=1 to skip tests that need it)"
        )
        if os.environ.get("SAMPLEFLOW_ALLOW_NO_SHARED") == "1":
            pytest.skip(message)
        pytest.fail(message)
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared data folder (``../shared`` relative to the project root)."""
    return require_shared()


@pytest.fixture(scope="session")
def captures_dir() -> Path:
    """The shared flow export captures with their tshark reference decodes."""
    return require_shared("captures")


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """Put structlog's defaults back after each test: cli.main() configures
    it to write to the sys.stderr of the moment, which under pytest is the
    test's capture file, closed once the test ends; a later test that logs
    would write to a closed file."""
    yield
    structlog.reset_defaults()
