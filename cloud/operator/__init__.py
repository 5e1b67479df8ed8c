"""Operator tooling: publish relay models as AWS IoT jobs and follow them.

``sampleflow models keygen|push|status|cancel|rollback`` (see
:mod:`cloud.operator.commands`), over :class:`ModelOps`.  The job document
format is :mod:`edge_agent.modelsync.document`; docs/model-updates.md
explains the whole path.
"""

from cloud.operator.keys import generate_keypair, load_private_key, sign
from cloud.operator.ops import (
    ExecutionRow,
    JobStatus,
    ModelOps,
    ModelOpsError,
    PushResult,
)
from cloud.operator.rollout import RolloutSettings

__all__ = [
    "ExecutionRow",
    "JobStatus",
    "ModelOps",
    "ModelOpsError",
    "PushResult",
    "RolloutSettings",
    "generate_keypair",
    "load_private_key",
    "sign",
]
