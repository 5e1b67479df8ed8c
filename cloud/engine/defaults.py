"""Engine setting defaults and the setting error, without Spark.

The command line builds its parser from these on every ``sampleflow``
call, so this module must stay light (no pyspark import).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


class ConfigError(ValueError):
    """A setting is missing or out of range; the message names it."""


#: Private IPv4 ranges (RFC 1918) and IPv6 unique local addresses (RFC 4193):
#: every tenant's internal networks unless it has its own.
PRIVATE_NETWORKS: tuple[str, ...] = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "fc00::/7",
)
#: The demo tenant of the local stack (cloud/local, tenant ``local``) replays
#: CTU-13, whose university network is 147.32.0.0/16.
DEFAULT_TENANT_NETWORKS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("local", (*PRIVATE_NETWORKS, "147.32.0.0/16")),
)
DETECTION_MODES = ("alerts", "all")


def tenant_networks(
    pairs: Mapping[str, Sequence[str]],
) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``{tenant: [cidr, ...]}`` in the hashable form EngineConfig keeps."""
    return tuple(sorted((t, tuple(c)) for t, c in pairs.items()))


#: Where the local stack (cloud/local) runs the model service and the store.
LOCAL_MODEL_SERVICE_URL = "http://127.0.0.1:8480"
LOCAL_MONGO_URI = "mongodb://127.0.0.1:27017/?directConnection=true"
#: The engine's /metrics and /healthz port (the relay's is 9464).
DEFAULT_STATUS_PORT = 9466
