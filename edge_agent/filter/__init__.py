"""The relay's TFLite scoring filter (see :mod:`edge_agent.filter.filter`)."""

from edge_agent.filter.filter import (
    HOST_SCORE_DTYPE,
    FilterCounters,
    FilterResult,
    RelayFilter,
)
from edge_agent.filter.history import HISTORY_DTYPE, ScoringHistory
from edge_agent.filter.model import LoadedModel, ModelLoadError, load_model
from edge_agent.filter.rollup import rollup

__all__ = [
    "HISTORY_DTYPE",
    "HOST_SCORE_DTYPE",
    "FilterCounters",
    "FilterResult",
    "LoadedModel",
    "ModelLoadError",
    "RelayFilter",
    "ScoringHistory",
    "load_model",
    "rollup",
]
