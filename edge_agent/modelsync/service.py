"""The jobs agent hosted inside a running relay (``sampleflow relay run``).

:class:`ModelSyncService` is the component the relay wires in when its
settings have a ``[modelsync]`` section: a :class:`~.agent.JobsAgent`
whose :class:`~.installer.FilterInstaller` swaps the model of the
pipeline's own :class:`~edge_agent.filter.RelayFilter`.  The filter reads
its model reference once per batch, so a swap takes effect between two
batches and no record is lost or scored twice.

The agent is blocking code driven by awsiotsdk callbacks (they arrive on
the MQTT client's own threads), so it runs in one daemon thread of its
own; downloads, the fresh-interpreter load and the canary run there too,
never in the event loop.  The relay keeps relaying whatever the broker
does: a first connection that fails is retried with backoff inside that
thread, and a lost connection is resumed by the MQTT client.

Life cycle: :meth:`load_current` (before the pipeline starts: the model
the store's ``current`` names replaces the configured one), :meth:`start`,
:meth:`stop`.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import structlog

from edge_agent.filter import RelayFilter
from edge_agent.modelsync import store as st
from edge_agent.modelsync.agent import JobsAgent
from edge_agent.modelsync.config import ModelSyncConfig
from edge_agent.modelsync.errors import ModelRejectedError
from edge_agent.modelsync.installer import filter_installer
from edge_agent.modelsync.runner import ModelSyncCounters, UpdateRunner
from edge_agent.modelsync.verify import check_digest, file_digest, trusted_keys

log = structlog.get_logger(__name__)

#: Seconds :meth:`ModelSyncService.stop` waits for the agent thread.  An
#: install still running then is abandoned; its state file makes the next
#: start finish it or undo it.
STOP_TIMEOUT_S = 10.0


class ModelSyncService:
    """The relay's in-process model-update agent (see the module doc).

    Construction loads the trusted public keys (raises ``OSError`` or
    ``ValueError`` naming the file when one is unreadable) and creates the
    models folder; nothing connects until :meth:`start`.
    """

    def __init__(self, config: ModelSyncConfig, relay_filter: RelayFilter) -> None:
        self.config = config
        self.filter = relay_filter
        self.installer = filter_installer(relay_filter, config)
        self.store = st.ModelStore(config.models_dir)
        self.counters = ModelSyncCounters()
        self.runner = UpdateRunner(
            config,
            self.store,
            self.installer,
            trusted_keys(config.public_keys),
            counters=self.counters,
        )
        self.agent = JobsAgent(config, self.runner)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def connected(self) -> bool:
        """Whether the agent's MQTT connection is up right now."""
        return self.agent.connected

    def load_current(self, configured: Path | None) -> st.InstalledModel | None:
        """Repair the store and put its current model into the filter.

        A relay whose store is still empty provisions ``configured`` (the
        filter's model manifest, e.g. the shipped one) as its first version,
        so that every later update has a previous model on disk and reports
        the version that runs.  Returns the model now current (None: the
        store is empty and ``configured`` could not be provisioned; the
        pipeline then loads the configured model itself).  Blocking: call it
        from a worker thread.
        """
        try:
            current = self.runner.start()
        except (OSError, ModelRejectedError) as exc:
            # The relay still runs (on the configured model); installs will
            # report what is wrong with the folder.
            log.error(
                "modelsync_store_unusable",
                models_dir=str(self.store.root),
                error=str(exc),
            )
            return None
        if current is not None or configured is None:
            return current
        try:
            entry = self._provision(configured)
        except (OSError, ValueError, KeyError, ModelRejectedError) as exc:
            log.warning(
                "modelsync_provision_failed", manifest=str(configured), error=str(exc)
            )
            return None
        self.store.set_current(entry)
        current = self.store.current()
        if current is not None:
            self.installer.swap(current.model_path, current.manifest)
            log.info(
                "modelsync_provisioned", model=current.name, version=current.version
            )
        return current

    def _provision(self, manifest_path: Path) -> str:
        """Copy a local model and its manifest into versions/; the entry."""
        manifest = json.loads(manifest_path.read_bytes())
        model = manifest_path.parent / str(manifest["model_file"])
        size, sha = file_digest(model)
        check_digest(
            "model", size, sha, int(manifest["bytes"]), str(manifest["sha256"])
        )
        staged = self.store.new_tmp()
        try:
            shutil.copyfile(model, staged / str(manifest["model_file"]))
            shutil.copyfile(manifest_path, staged / st.MANIFEST_FILE)
            entry = st.entry_name(str(manifest["name"]), str(manifest["version"]), sha)
            self.store.commit(staged, entry)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        return entry

    def start(self) -> None:
        """Run the agent in its daemon thread."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name="modelsync-agent", daemon=True
        )
        self._thread.start()
        log.info(
            "modelsync_started",
            thing=self.config.thing_name,
            endpoint=f"{self.config.endpoint}:{self.config.port}",
        )

    def _run(self) -> None:
        try:
            self.agent.run(self._stop)
        except Exception:  # the relay goes on relaying without updates
            log.exception("modelsync_agent_died")

    @property
    def alive(self) -> bool:
        """Whether the agent thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Ask the agent to stop and wait up to ``timeout_s`` for it.

        Blocking: call it from a worker thread.
        """
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        self.agent.wake()
        thread.join(timeout_s)
        if thread.is_alive():
            log.warning(
                "modelsync_stop_timeout",
                job_id=self.agent.current_job,
                timeout_s=timeout_s,
            )
