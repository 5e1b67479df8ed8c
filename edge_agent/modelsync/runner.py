"""The install pipeline of one job execution, and restart reconciliation.

:class:`UpdateRunner` knows nothing of MQTT: the jobs agent hands it a job
execution (id, execution number, document) and reports the
:class:`Outcome` it returns.  Steps, each recorded in ``state.json``
before the next one starts (see :mod:`.store`):

1. ``downloading``: manifest then model into a fresh tmp/ folder, each
   bounded by the size the document gives; sizes and SHA-256 checked; the
   manifest's Ed25519 signature checked; the manifest cross-checked with
   the document;
2. the installer's ``validate_and_canary`` on the staged file;
3. ``installing``: the staged folder is renamed into versions/;
4. ``current`` is pointed at it (the old one becomes ``previous``), then
   the installer swaps the running model;
5. ``installed``: the agent reports SUCCEEDED.

Any refusal writes ``failed`` with its reason and leaves ``current``
alone; the agent reports FAILED.  After a restart the same execution is
handed back by the broker (start-next returns IN_PROGRESS executions), and
:meth:`UpdateRunner.run` resumes from the recorded phase: ``installed``
and ``failed`` are re-reported, ``installing`` is rolled forward (the
version folder was verified before it was renamed in), ``downloading``
starts over, at most ``max_attempts`` times.  If the job stopped while the
relay was away (canceled, timed out), :meth:`UpdateRunner.settle` moves
``current`` back to the model that ran before, so what runs always
matches what the job says.
"""

from __future__ import annotations

import collections
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_agent.modelsync import store as st
from edge_agent.modelsync.config import ModelSyncConfig
from edge_agent.modelsync.document import parse_document
from edge_agent.modelsync.download import download
from edge_agent.modelsync.errors import (
    INSTALL_FAILED,
    INTERRUPTED,
    TOO_LARGE,
    ModelRejectedError,
)
from edge_agent.modelsync.installer import ModelInstaller
from edge_agent.modelsync.verify import check_digest, parse_manifest, verify_signature

log = structlog.get_logger(__name__)

SUCCEEDED = "SUCCEEDED"
FAILED = "FAILED"

#: Points where a test can stop the relay (see ``PauseHook``).
PAUSE_POINTS = ("download", "before-pointer", "after-pointer")
#: Called at each point of :data:`PAUSE_POINTS`; production passes None.
PauseHook = Callable[[str], None]
#: Reports progress (a phase name) while an execution runs.
ProgressHook = Callable[[str], None]


@dataclass(frozen=True)
class Outcome:
    """What to report for a job execution: status and statusDetails."""

    status: str
    details: dict[str, str]


@dataclass
class ModelSyncCounters:
    """Everything that moves in the update path (read by the metrics code)."""

    jobs_started: int = 0
    jobs_succeeded: int = 0
    jobs_failed: int = 0
    #: refusals by reason code (:mod:`.errors`)
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    resumed: int = 0  # executions resumed after a restart
    rolled_back: int = 0  # installs undone because the job stopped meanwhile
    downloads: int = 0  # files fetched whole (a manifest or a model)
    downloaded_bytes: int = 0
    reconnects: int = 0
    connect_failures: int = 0
    reports_failed: int = 0  # status updates the broker refused or lost
    requests_rejected: int = 0  # other jobs requests the broker refused
    cycle_errors: int = 0  # unexpected errors in a work cycle (logged)


def _details(**values: object) -> dict[str, str]:
    # statusDetails values must be non-empty strings.
    return {k: str(v)[:900] for k, v in values.items() if v not in (None, "")}


class UpdateRunner:
    """Runs and resumes installs for one relay (see the module doc)."""

    def __init__(
        self,
        config: ModelSyncConfig,
        store: st.ModelStore,
        installer: ModelInstaller,
        keys: Mapping[str, Ed25519PublicKey],
        *,
        counters: ModelSyncCounters | None = None,
        pause: PauseHook | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.installer = installer
        self.keys = dict(keys)
        self.counters = counters or ModelSyncCounters()
        self._pause = pause
        self._s3: Any = None
        #: set by :meth:`start`
        self.started = False

    # -- start-up ------------------------------------------------------------
    def start(self) -> st.InstalledModel | None:
        """Repair the store and load the current model into the installer."""
        self.started = True
        current = self.store.recover()
        if current is not None:
            self.installer.swap(current.model_path, current.manifest)
            log.info("modelsync_running", model=current.name, version=current.version)
        else:
            log.warning("modelsync_no_model", models_dir=str(self.store.root))
        return current

    def running_details(self) -> dict[str, str]:
        current = self.store.current()
        if current is None:
            return {}
        return _details(running_model=current.name, running_version=current.version)

    # -- one execution --------------------------------------------------------
    def run(
        self,
        job_id: str,
        execution_number: int,
        document: Mapping[str, Any] | None,
        progress: ProgressHook | None = None,
    ) -> Outcome:
        """Install (or resume installing) one job execution; never raises
        :class:`ModelRejectedError` (it becomes a FAILED outcome)."""
        state = self.store.read_state()
        if state is not None and (
            state.job_id != job_id or state.execution_number != execution_number
        ):
            # The broker hands executions oldest first and the agent settles
            # a recorded job before taking another, so this is a leftover.
            self.settle(state, "gone")
            state = None
        if state is None:
            state = st.UpdateState(
                job_id=job_id,
                execution_number=execution_number,
                phase=st.DOWNLOADING,
                previous=self.store.current_entry(),
            )
            self.counters.jobs_started += 1
        else:
            self.counters.resumed += 1
            resumed = self._resume(state)
            if resumed is not None:
                return resumed
        self.store.write_state(state)
        return self._install(state, document, progress)

    def _resume(self, state: st.UpdateState) -> Outcome | None:
        log.info("modelsync_resume", job_id=state.job_id, phase=state.phase)
        if state.phase == st.FAILED:
            return self._failed_outcome(state)
        if state.phase in (st.INSTALLED, st.INSTALLING):
            target = self.store.load(state.target)
            if target is not None:
                return self._activate(state, target)
        state.attempts += 1
        if state.attempts > self.config.max_attempts:
            return self._fail(
                state,
                ModelRejectedError(
                    INTERRUPTED,
                    f"the relay restarted {state.attempts - 1} times during this job",
                ),
            )
        state.phase = st.DOWNLOADING
        return None

    def _install(
        self,
        state: st.UpdateState,
        document: Mapping[str, Any] | None,
        progress: ProgressHook | None,
    ) -> Outcome:
        staged = self.store.new_tmp()
        try:
            doc = parse_document(document)
            state.details = _details(
                requested_model=doc.model, requested_version=doc.version
            )
            if doc.size > self.config.max_model_bytes:
                raise ModelRejectedError(
                    TOO_LARGE,
                    f"model is {doc.size} bytes, this relay takes at most "
                    f"{self.config.max_model_bytes}",
                )
            if progress is not None:
                progress(st.DOWNLOADING)
            got = self._fetch(
                doc.manifest_source, staged / st.MANIFEST_FILE, doc.manifest_size
            )
            check_digest(
                "manifest", got.size, got.sha256, doc.manifest_size, doc.manifest_sha256
            )
            manifest_bytes = got.path.read_bytes()
            verify_signature(manifest_bytes, doc.signature, doc.key_id, self.keys)
            manifest = parse_manifest(manifest_bytes, doc)
            model_path = staged / str(manifest["model_file"])
            got = self._fetch(
                doc.model_source,
                model_path,
                doc.size,
                on_chunk=(lambda _n: self._pause_at("download"))
                if self._pause
                else None,
            )
            check_digest("model", got.size, got.sha256, doc.size, doc.sha256)
            (staged / st.SIGNATURE_FILE).write_text(doc.signature + "\n")
            if progress is not None:
                progress("verifying")
            self.installer.validate_and_canary(model_path, manifest)
            entry = st.entry_name(doc.model, doc.version, doc.sha256)
            installed = self.store.commit(staged, entry)
            state.phase, state.target = st.INSTALLING, entry
            self.store.write_state(state)
        except ModelRejectedError as exc:
            shutil.rmtree(staged, ignore_errors=True)
            return self._fail(state, exc)
        except OSError as exc:
            shutil.rmtree(staged, ignore_errors=True)
            return self._fail(state, ModelRejectedError(INSTALL_FAILED, repr(exc)))
        return self._activate(state, installed)

    def _activate(self, state: st.UpdateState, target: st.InstalledModel) -> Outcome:
        """Point ``current`` at the verified target and swap; INSTALLED."""
        self._pause_at("before-pointer")
        try:
            self.store.set_current(target.entry)
            self._pause_at("after-pointer")
            self.installer.swap(target.model_path, target.manifest)
        except (ModelRejectedError, OSError) as exc:
            self._restore(state)
            error = (
                exc
                if isinstance(exc, ModelRejectedError)
                else ModelRejectedError(INSTALL_FAILED, repr(exc))
            )
            return self._fail(state, error)
        state.phase = st.INSTALLED
        self.store.write_state(state)
        self.store.prune(keep=set())
        self.counters.jobs_succeeded += 1
        log.info(
            "modelsync_installed",
            job_id=state.job_id,
            model=target.name,
            version=target.version,
        )
        return Outcome(
            SUCCEEDED,
            _details(
                running_model=target.name,
                running_version=target.version,
                sha256=str(target.manifest.get("sha256", ""))[:16],
                attempts=state.attempts,
            ),
        )

    def _fetch(self, source: Any, dest: Path, size: int, on_chunk: Any = None) -> Any:
        got = download(
            source,
            dest,
            max_bytes=size,
            timeout_s=self.config.download_timeout_s,
            chunk_bytes=self.config.download_chunk_bytes,
            s3_client=self._s3_client,
            on_chunk=on_chunk,
        )
        self.counters.downloads += 1
        self.counters.downloaded_bytes += got.size
        return got

    def _s3_client(self) -> Any:
        if self._s3 is None:
            self._s3 = boto3.session.Session().client(
                "s3",
                region_name=self.config.s3_region,
                endpoint_url=self.config.s3_endpoint_url,
            )
        return self._s3

    def _fail(self, state: st.UpdateState, exc: ModelRejectedError) -> Outcome:
        state.phase, state.reason, state.detail = st.FAILED, exc.reason, exc.detail
        try:
            self.store.write_state(state)
        except OSError as write_error:  # the report still goes out
            log.warning("modelsync_state_write_failed", error=str(write_error))
        self.counters.jobs_failed += 1
        self.counters.failures[exc.reason] += 1
        log.warning(
            "modelsync_rejected",
            job_id=state.job_id,
            reason=exc.reason,
            detail=exc.detail,
        )
        return self._failed_outcome(state)

    def _failed_outcome(self, state: st.UpdateState) -> Outcome:
        return Outcome(
            FAILED,
            {
                **state.details,
                **_details(reason=state.reason, detail=state.detail),
                **self.running_details(),
            },
        )

    # -- after the report / after a restart --------------------------------
    def reported(self, job_id: str) -> None:
        """The broker accepted the final report: forget the update."""
        state = self.store.read_state()
        if state is not None and state.job_id == job_id:
            self.store.clear_state()

    def recorded_outcome(self, state: st.UpdateState) -> Outcome:
        """The outcome a state in phase installed or failed stands for."""
        if state.phase == st.FAILED:
            return self._failed_outcome(state)
        current = self.store.current()
        if current is None or current.entry != state.target:
            return self._failed_outcome(state)
        return Outcome(
            SUCCEEDED,
            _details(
                running_model=current.name,
                running_version=current.version,
                attempts=state.attempts,
            ),
        )

    def settle(self, state: st.UpdateState, job_status: str) -> None:
        """Finish a recorded update whose execution is no longer ours to run.

        ``job_status`` is the execution's final status on the broker, "gone"
        (deleted), "ENDED" (canceled or timed out before any report) or
        "unknown".  A model this update put in place stays only if the job
        SUCCEEDED; it also stays, with a warning, when the status is unknown
        and the update had been recorded installed (most likely its report
        was accepted just before a restart).  Otherwise it is undone, so that
        what runs matches the job.
        """
        keep = job_status == SUCCEEDED or (
            job_status in ("unknown", "gone") and state.phase == st.INSTALLED
        )
        if job_status in ("unknown", "gone") and state.phase == st.INSTALLED:
            log.warning(
                "modelsync_settle_uncertain", job_id=state.job_id, status=job_status
            )
        if (
            not keep
            and state.phase in (st.INSTALLING, st.INSTALLED)
            and self.store.current_entry() == state.target
        ):
            self._restore(state)
            self.counters.rolled_back += 1
        log.info(
            "modelsync_settled",
            job_id=state.job_id,
            phase=state.phase,
            status=job_status,
        )
        self.store.clear_state()

    def _restore(self, state: st.UpdateState) -> None:
        """Put back the model that ran before ``state``'s update."""
        previous = self.store.load(state.previous)
        if previous is None:
            return  # nothing to go back to: keep what is intact
        self.store.point_back(previous.entry, state.target)
        self.installer.swap(previous.model_path, previous.manifest)
        log.warning("modelsync_restored", job_id=state.job_id, version=previous.version)

    def _pause_at(self, point: str) -> None:
        if self._pause is not None:
            self._pause(point)
