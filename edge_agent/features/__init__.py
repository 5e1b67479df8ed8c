"""Host-window features from sampled flows (numpy only).

One implementation shared by the relay filter, the cloud engine and model
training: :func:`host_window_features` computes the rows,
:class:`FeatureScaler` scales them per network, and
:mod:`edge_agent.features.scoring` turns auto-encoder reconstructions into a
threat score.  The spec is versioned by :data:`FEATURE_SPEC_VERSION`.
"""

from edge_agent.features.extract import (
    FeatureInputError,
    FeatureSpecError,
    HostWindows,
    InternalNetworks,
    address_halves,
    halves_to_v16,
    host_window_features,
)
from edge_agent.features.scaling import FeatureScaler
from edge_agent.features.spec import (
    DEFAULT_WINDOW_S,
    FEATURE_NAMES,
    FEATURE_SPEC_VERSION,
    RELAY_FEATURES,
)

__all__ = [
    "DEFAULT_WINDOW_S",
    "FEATURE_NAMES",
    "FEATURE_SPEC_VERSION",
    "RELAY_FEATURES",
    "FeatureInputError",
    "FeatureScaler",
    "FeatureSpecError",
    "HostWindows",
    "InternalNetworks",
    "address_halves",
    "halves_to_v16",
    "host_window_features",
]
