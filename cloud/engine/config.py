"""The engine's settings, checked once at start-up."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cloud.engine.kinesis.source import STARTING_POSITIONS


class ConfigError(ValueError):
    """A setting is missing or out of range; the message names it."""


@dataclass(frozen=True)
class EngineConfig:
    """Settings of one engine (one stream, one checkpoint).

    Times are seconds.  A flow row counts in every window (``window_s``
    long, starting every ``slide_s``) that holds its ``time_end``; a window
    is final once the latest ``time_end`` seen for its tenant is
    ``lateness_s`` past the window's end.  ``state_path`` (the driver-local
    SQLite file of :mod:`cloud.engine.store`) defaults to a file in the
    checkpoint folder, which then must be a local path.
    """

    stream_name: str
    checkpoint_dir: str
    endpoint_url: str | None = None
    region: str | None = None
    starting_position: str = "TRIM_HORIZON"
    max_records_per_batch: int = 10_000
    max_bytes_per_batch: int = 64 * 1024 * 1024
    trigger_interval_s: float = 2.0
    window_s: int = 60
    slide_s: int = 10
    lateness_s: int = 120
    confidence: float = 0.95
    dedup_horizon_s: int = 7 * 24 * 3600
    state_path: str | None = None
    estimates_path: str | None = None
    master: str | None = "local[*]"
    shuffle_partitions: int = 4
    query_name: str = "sampleflow-engine"

    def __post_init__(self) -> None:
        if not self.stream_name:
            raise ConfigError("stream_name is required")
        if not self.checkpoint_dir:
            raise ConfigError("checkpoint_dir is required")
        if self.starting_position not in STARTING_POSITIONS:
            raise ConfigError(
                f"starting_position must be one of {STARTING_POSITIONS}, "
                f"got {self.starting_position!r}"
            )
        for name in (
            "max_records_per_batch",
            "max_bytes_per_batch",
            "window_s",
            "slide_s",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.slide_s > self.window_s:
            raise ConfigError(
                f"slide_s ({self.slide_s}) must not exceed window_s ({self.window_s})"
            )
        if self.trigger_interval_s <= 0:
            raise ConfigError(
                f"trigger_interval_s must be > 0, got {self.trigger_interval_s}"
            )
        if self.lateness_s < 0:
            raise ConfigError(f"lateness_s must be >= 0, got {self.lateness_s}")
        if not 0.0 < self.confidence < 1.0:
            raise ConfigError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.state_path is None and "://" in self.checkpoint_dir:
            raise ConfigError(
                "state_path is required when checkpoint_dir is not a local path "
                f"({self.checkpoint_dir!r})"
            )

    @property
    def resolved_state_path(self) -> Path:
        """Where the SQLite state lives."""
        if self.state_path is not None:
            return Path(self.state_path)
        return Path(self.checkpoint_dir) / "engine-state.sqlite"

    def source_options(self) -> dict[str, str]:
        """Options of the Kinesis source (``format("kinesis")``)."""
        options = {
            "streamName": self.stream_name,
            "startingPosition": self.starting_position,
            "maxRecordsPerBatch": str(self.max_records_per_batch),
            "maxBytesPerBatch": str(self.max_bytes_per_batch),
        }
        if self.endpoint_url:
            options["endpointUrl"] = self.endpoint_url
        if self.region:
            options["region"] = self.region
        return options
