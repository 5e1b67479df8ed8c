"""Model updates on the relay: the AWS IoT Jobs agent and the install path.

Operators publish a new model as an IoT job (``sampleflow models push``);
:class:`JobsAgent` takes it over MQTT (mutual TLS), :class:`UpdateRunner`
downloads, verifies (size, SHA-256, Ed25519 signature of the manifest),
canaries and installs it through a :class:`ModelInstaller`, keeping the
previous model on disk, and the agent reports the execution SUCCEEDED or
FAILED with the reason.  :class:`ModelSyncService` hosts the agent in
``sampleflow relay run``.  See docs/model-updates.md.
"""

from edge_agent.modelsync.agent import JobsAgent
from edge_agent.modelsync.config import ModelSyncConfig, ModelSyncConfigError
from edge_agent.modelsync.document import ModelJobDocument, Source, parse_document
from edge_agent.modelsync.errors import REASONS, ModelRejectedError
from edge_agent.modelsync.installer import (
    CanaryPolicy,
    FilterInstaller,
    ModelInstaller,
)
from edge_agent.modelsync.runner import ModelSyncCounters, Outcome, UpdateRunner
from edge_agent.modelsync.service import ModelSyncService
from edge_agent.modelsync.store import InstalledModel, ModelStore, UpdateState

__all__ = [
    "REASONS",
    "CanaryPolicy",
    "FilterInstaller",
    "InstalledModel",
    "JobsAgent",
    "ModelInstaller",
    "ModelJobDocument",
    "ModelRejectedError",
    "ModelStore",
    "ModelSyncConfig",
    "ModelSyncConfigError",
    "ModelSyncCounters",
    "ModelSyncService",
    "Outcome",
    "Source",
    "UpdateRunner",
    "UpdateState",
    "parse_document",
]
