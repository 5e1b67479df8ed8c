"""The relay's AWS IoT Jobs agent: MQTT over mutual TLS, one job at a time.

It connects with the relay's X.509 certificate (``awsiot``'s
``mqtt_connection_builder.mtls_from_path``), subscribes to its thing's
jobs topics (``notify-next``, ``start-next/accepted|rejected``,
``+/get/accepted|rejected``, ``+/update/accepted|rejected``) and works the
queue with StartNextPendingJobExecution: after connecting, after every
reconnect (an update published while the relay was offline is waiting in
the queue), on every ``notify-next`` naming a job, and every
``poll_interval_s`` (configuration) as a safety net.  Each execution is handed to
:class:`~edge_agent.modelsync.runner.UpdateRunner` and its outcome is
reported with UpdateJobExecution (statusDetails carry the running model
version).  Requests are matched to answers by ``clientToken``.

A broker that goes away: the MQTT client reconnects by itself with
exponential backoff between ``reconnect_min_s`` and ``reconnect_max_s``;
a first connection that fails is retried with the same backoff.  A
request whose answer does not come within ``request_timeout_s`` abandons
the cycle; the runner's state file keeps the outcome, so the next cycle
(after the reconnect) reports it again.  Before taking a new execution,
an update recorded in the state file is settled against the broker's
view of its execution (DescribeJobExecution).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import random
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import structlog
from awscrt import mqtt
from awsiot import iotjobs, mqtt_connection_builder

from edge_agent.modelsync import store as st
from edge_agent.modelsync.config import ModelSyncConfig
from edge_agent.modelsync.document import is_model_document
from edge_agent.modelsync.runner import ModelSyncCounters, Outcome, UpdateRunner
from edge_agent.modelsync.store import UpdateState

log = structlog.get_logger(__name__)

_QOS = mqtt.QoS.AT_LEAST_ONCE
_TERMINAL = frozenset(
    {"SUCCEEDED", "FAILED", "TIMED_OUT", "CANCELED", "REJECTED", "REMOVED"}
)


#: Rejection codes meaning the execution is no longer ours to update.
_JOB_MOVED_ON = frozenset(
    {"InvalidStateTransition", "TerminalStateReached", "ResourceNotFound"}
)


class BrokerUnavailableError(RuntimeError):
    """A jobs request got no answer in time (the connection is down)."""


class JobRequestRejectedError(RuntimeError):
    """The broker answered a jobs request on its ``rejected`` topic."""

    def __init__(self, rejected: Any) -> None:
        super().__init__(f"{rejected.code}: {rejected.message}")
        self.code = str(rejected.code)
        state = rejected.execution_state
        self.status = str(state.status) if state is not None and state.status else ""


class JobsAgent:
    """Connects, takes the next pending execution, runs it, reports it.

    Construction is inert; :meth:`run` blocks until ``stop`` is set.
    """

    def __init__(
        self,
        config: ModelSyncConfig,
        runner: UpdateRunner,
        counters: ModelSyncCounters | None = None,
        poll_interval_s: float | None = None,
    ) -> None:
        self.config = config
        self.runner = runner
        self.counters = counters or runner.counters
        #: default: the configuration's ``poll_interval_s``
        self.poll_interval_s = (
            config.poll_interval_s if poll_interval_s is None else poll_interval_s
        )
        self.thing = config.thing_name
        self._wake = threading.Event()
        self._connected = threading.Event()
        self._pending: dict[str, concurrent.futures.Future[Any]] = {}
        self._pending_lock = threading.Lock()
        self._tokens = itertools.count(1)
        self._prefix = uuid.uuid4().hex[:8]
        self._conn: mqtt.Connection | None = None
        self._jobs: iotjobs.IotJobsClient | None = None
        #: executions handed out so far, and start-next answers with none
        self.cycles = 0
        self.idle_cycles = 0
        #: the job whose execution is being installed right now ("" if none)
        self.current_job = ""

    @property
    def connected(self) -> bool:
        """Whether the MQTT connection is up right now."""
        return self._connected.is_set()

    def wake(self) -> None:
        """Ask for the job queue to be checked now (also used to stop fast)."""
        self._wake.set()

    # -- connection -------------------------------------------------------------
    def _build_connection(self) -> mqtt.Connection:
        c = self.config
        return mqtt_connection_builder.mtls_from_path(
            cert_filepath=str(c.cert_path),
            pri_key_filepath=str(c.key_path),
            ca_filepath=str(c.ca_path),
            endpoint=c.endpoint,
            port=c.port,
            client_id=c.thing_name,
            clean_session=False,
            keep_alive_secs=c.keep_alive_s,
            reconnect_min_timeout_secs=c.reconnect_min_s,
            reconnect_max_timeout_secs=c.reconnect_max_s,
            on_connection_interrupted=self._on_interrupted,
            on_connection_resumed=self._on_resumed,
            enable_metrics_collection=False,
        )

    def _on_interrupted(self, connection: Any, error: Any, **kwargs: Any) -> None:
        self._connected.clear()
        log.warning("modelsync_broker_lost", error=str(error))

    def _on_resumed(
        self, connection: Any, return_code: Any, session_present: bool, **kwargs: Any
    ) -> None:
        self.counters.reconnects += 1
        log.info("modelsync_broker_back", session_present=session_present)
        if not session_present:
            # A new session has no subscriptions: the broker forgot them.
            connection.resubscribe_existing_topics()
        self._connected.set()
        self._wake.set()

    def _connect(self, stop: threading.Event) -> bool:
        """First connection, retried with exponential backoff; False if stopped."""
        delay = float(self.config.reconnect_min_s)
        while not stop.is_set():
            self._conn = self._build_connection()
            try:
                self._conn.connect().result(self.config.request_timeout_s)
                self._jobs = iotjobs.IotJobsClient(self._conn)
                self._subscribe()
            except Exception as exc:  # awscrt raises its own error types
                self.counters.connect_failures += 1
                log.warning(
                    "modelsync_connect_failed",
                    endpoint=f"{self.config.endpoint}:{self.config.port}",
                    error=str(exc),
                    retry_s=round(delay, 1),
                )
                self._close_quietly()
                stop.wait(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, float(self.config.reconnect_max_s))
                continue
            self._connected.set()
            log.info("modelsync_connected", thing=self.thing)
            return True
        return False

    def _close_quietly(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.disconnect().result(2.0)
            except Exception:  # already down: nothing to close
                log.debug("modelsync_disconnect_ignored")

    def _subscribe(self) -> None:
        jobs = self._jobs
        assert jobs is not None
        timeout = self.config.request_timeout_s
        thing = self.thing
        subs: list[tuple[Any, Any, Callable[[Any], None]]] = [
            (
                jobs.subscribe_to_next_job_execution_changed_events,
                iotjobs.NextJobExecutionChangedSubscriptionRequest(thing_name=thing),
                self._on_notify_next,
            ),
            (
                jobs.subscribe_to_start_next_pending_job_execution_accepted,
                iotjobs.StartNextPendingJobExecutionSubscriptionRequest(
                    thing_name=thing
                ),
                self._on_answer,
            ),
            (
                jobs.subscribe_to_start_next_pending_job_execution_rejected,
                iotjobs.StartNextPendingJobExecutionSubscriptionRequest(
                    thing_name=thing
                ),
                self._on_rejected,
            ),
            (
                jobs.subscribe_to_describe_job_execution_accepted,
                iotjobs.DescribeJobExecutionSubscriptionRequest(
                    thing_name=thing, job_id="+"
                ),
                self._on_answer,
            ),
            (
                jobs.subscribe_to_describe_job_execution_rejected,
                iotjobs.DescribeJobExecutionSubscriptionRequest(
                    thing_name=thing, job_id="+"
                ),
                self._on_rejected,
            ),
            (
                jobs.subscribe_to_update_job_execution_accepted,
                iotjobs.UpdateJobExecutionSubscriptionRequest(
                    thing_name=thing, job_id="+"
                ),
                self._on_answer,
            ),
            (
                jobs.subscribe_to_update_job_execution_rejected,
                iotjobs.UpdateJobExecutionSubscriptionRequest(
                    thing_name=thing, job_id="+"
                ),
                self._on_rejected,
            ),
        ]
        for subscribe, request, callback in subs:
            future, _topic = subscribe(request, _QOS, callback)
            future.result(timeout)

    # -- answers -------------------------------------------------------------
    def _on_notify_next(self, event: Any) -> None:
        if event.execution is not None:
            log.info("modelsync_job_notified", job_id=event.execution.job_id)
            self._wake.set()

    def _resolve(self, token: str | None, value: Any, error: bool) -> None:
        if token is None:
            return
        with self._pending_lock:
            future = self._pending.pop(token, None)
        if future is None:
            return  # an answer to a request we gave up on
        if error:
            future.set_exception(JobRequestRejectedError(value))
        else:
            future.set_result(value)

    def _on_answer(self, response: Any) -> None:
        self._resolve(response.client_token, response, error=False)

    def _on_rejected(self, rejected: Any) -> None:
        self._resolve(rejected.client_token, rejected, error=True)

    def _request(self, publish: Callable[[Any, Any], Any], request: Any) -> Any:
        """Publish with a fresh clientToken and wait for its answer."""
        token = f"{self._prefix}-{next(self._tokens)}"
        request.client_token = token
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._pending_lock:
            self._pending[token] = future
        try:
            publish(request, _QOS)
            return future.result(self.config.request_timeout_s)
        except concurrent.futures.TimeoutError as exc:
            raise BrokerUnavailableError("no answer from the broker") from exc
        finally:
            with self._pending_lock:
                self._pending.pop(token, None)

    # -- the work loop ----------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Start the runner (unless the host did already), connect, and work
        jobs until ``stop`` is set."""
        if not self.runner.started:
            self.runner.start()
        if not self._connect(stop):
            return
        self._wake.set()
        next_poll = time.monotonic()
        try:
            while not stop.is_set():
                # Short waits so that ``stop`` is seen within a second.
                if not self._wake.wait(1.0) and time.monotonic() < next_poll:
                    continue
                if stop.is_set() or not self._connected.wait(1.0):
                    continue  # a reconnect sets the wake-up again
                self._wake.clear()
                next_poll = time.monotonic() + self.poll_interval_s
                try:
                    while not stop.is_set() and self._work_once():
                        pass
                except BrokerUnavailableError:
                    log.info("modelsync_cycle_abandoned", reason="no answer")
                    stop.wait(1.0)
                    self._wake.set()
                except JobRequestRejectedError as exc:
                    # e.g. start-next refused: retried at the next poll.
                    self.counters.requests_rejected += 1
                    log.warning("modelsync_request_rejected", error=str(exc))
                except Exception:
                    # A bug must not stop updates for good: log, wait, retry.
                    self.counters.cycle_errors += 1
                    log.exception("modelsync_cycle_failed")
                    stop.wait(5.0)
                    self._wake.set()
        finally:
            self._close_quietly()

    def _work_once(self) -> bool:
        """Settle, take and run one execution; True if there may be more."""
        jobs = self._jobs
        assert jobs is not None
        state = self.runner.store.read_state()
        if state is not None:
            self._settle_recorded(state)
        answer = self._request(
            jobs.publish_start_next_pending_job_execution,
            iotjobs.StartNextPendingJobExecutionRequest(thing_name=self.thing),
        )
        execution = answer.execution
        if execution is None:
            self.idle_cycles += 1
            log.debug("modelsync_idle")
            return False
        self.cycles += 1
        job_id = str(execution.job_id)
        number = int(execution.execution_number or 1)
        document = execution.job_document
        if not is_model_document(document):
            self._report(
                job_id,
                number,
                Outcome("REJECTED", {"reason": "not_a_model_job"}),
            )
            return True
        log.info("modelsync_job_started", job_id=job_id, execution=number)
        self.current_job = job_id
        try:
            outcome = self.runner.run(
                job_id, number, document, progress=self._progress(job_id, number)
            )
        finally:
            self.current_job = ""
        self._report(job_id, number, outcome)
        return True

    def _settle_recorded(self, state: UpdateState) -> None:
        """Settle an update recorded before a restart, if its job has ended.

        The device plane does not describe finished executions (it answers
        TerminalStateReached without saying how they ended).  An update
        that never reached its report (downloading, installing) was ended
        by the service, so it is undone.  One whose outcome was recorded
        (installed, failed) may have been reported just before the restart:
        the outcome is sent again, and the rejection of that report carries
        the execution's real status.
        """
        status = self._execution_status(state.job_id)
        if status in ("QUEUED", "IN_PROGRESS"):
            return  # start-next hands it back and the runner resumes it
        if status == "terminal" and state.phase in (st.INSTALLED, st.FAILED):
            status = self._final_status(state)
        elif status == "terminal":
            status = "ENDED"  # canceled or timed out before any report
        self.runner.settle(state, status)

    def _execution_status(self, job_id: str) -> str:
        """QUEUED, IN_PROGRESS, "terminal" or "gone"."""
        jobs = self._jobs
        assert jobs is not None
        try:
            answer = self._request(
                jobs.publish_describe_job_execution,
                iotjobs.DescribeJobExecutionRequest(
                    thing_name=self.thing, job_id=job_id, include_job_document=False
                ),
            )
        except JobRequestRejectedError as exc:
            if exc.code == "ResourceNotFound":
                return "gone"
            if exc.status:
                return exc.status
            return "terminal"
        execution = answer.execution
        if execution is None:
            return "gone"
        status = str(execution.status)
        return "terminal" if status in _TERMINAL else status

    def _final_status(self, state: UpdateState) -> str:
        """Report the recorded outcome again; the real terminal status."""
        jobs = self._jobs
        assert jobs is not None
        outcome = self.runner.recorded_outcome(state)
        try:
            self._request(
                jobs.publish_update_job_execution,
                iotjobs.UpdateJobExecutionRequest(
                    thing_name=self.thing,
                    job_id=state.job_id,
                    execution_number=state.execution_number,
                    status=outcome.status,
                    status_details=outcome.details or None,
                ),
            )
        except JobRequestRejectedError as exc:
            return exc.status or "unknown"
        return outcome.status  # accepted: it had not been reported yet

    def _progress(self, job_id: str, number: int) -> Callable[[str], None]:
        def report(phase: str) -> None:
            jobs = self._jobs
            assert jobs is not None
            try:
                self._request(
                    jobs.publish_update_job_execution,
                    iotjobs.UpdateJobExecutionRequest(
                        thing_name=self.thing,
                        job_id=job_id,
                        execution_number=number,
                        status="IN_PROGRESS",
                        status_details={
                            "phase": phase,
                            **self.runner.running_details(),
                        },
                    ),
                )
            except (BrokerUnavailableError, JobRequestRejectedError) as exc:
                # Progress is informative; the final report is what counts.
                log.info("modelsync_progress_not_reported", phase=phase, error=str(exc))

        return report

    def _report(self, job_id: str, number: int, outcome: Outcome) -> None:
        jobs = self._jobs
        assert jobs is not None
        try:
            self._request(
                jobs.publish_update_job_execution,
                iotjobs.UpdateJobExecutionRequest(
                    thing_name=self.thing,
                    job_id=job_id,
                    execution_number=number,
                    status=outcome.status,
                    status_details=outcome.details or None,
                ),
            )
        except JobRequestRejectedError as exc:
            # Typically canceled or timed out meanwhile: the job has moved
            # on without us, so undo what it no longer backs.
            self.counters.reports_failed += 1
            log.warning("modelsync_report_rejected", job_id=job_id, error=str(exc))
            state = self.runner.store.read_state()
            if exc.code not in _JOB_MOVED_ON:
                return  # kept in the state file: reported again next cycle
            if state is not None and state.job_id == job_id:
                # Our report was refused, so the job ended without it.
                self.runner.settle(state, exc.status or "ENDED")
            return
        log.info(
            "modelsync_job_reported",
            job_id=job_id,
            status=outcome.status,
            **outcome.details,
        )
        self.runner.reported(job_id)
