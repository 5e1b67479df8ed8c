"""Push, follow, cancel and roll back model jobs (boto3: S3 and IoT).

:meth:`ModelOps.push` uploads a model and its manifest to S3, signs the
manifest bytes with the operators' Ed25519 key, and creates an AWS IoT job
for a thing group (one per tenant, one for all relays) whose document is
:class:`edge_agent.modelsync.document.ModelJobDocument`.  The S3 layout::

    s3://BUCKET/PREFIX/<model>/<version>/<sha12>/<model_file>
                                                /manifest.json
                                                /manifest.json.sig

Downloads are, by default, IoT Jobs presigned-URL placeholders: AWS IoT
signs a fresh S3 GET URL with ``presign_role_arn`` each time a relay reads
the document, so relays need no AWS credentials and no URL expires during
a slow rollout.  With ``s3_direct`` the document names bucket and key and
relays read them with their own credentials.

Job ids are ``sfmodel-<model>-<version>-<UTC time>-<4 hex>`` (AWS allows
``[a-zA-Z0-9_-]{1,64}``).  :meth:`ModelOps.rollback` finds the version the
group ran before (the newest earlier model job for that group with
another version that succeeded somewhere) and creates a new job with that
job's document: the artifacts and signature are already in S3, so a
rollback needs no private key.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import botocore.exceptions
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.operator.keys import sign
from cloud.operator.rollout import RolloutSettings
from edge_agent.modelsync.document import (
    ModelJobDocument,
    Source,
    is_model_document,
    parse_document,
)
from edge_agent.modelsync.errors import ModelRejectedError

log = structlog.get_logger(__name__)

JOB_PREFIX = "sfmodel-"
_JOB_ID_BAD = re.compile(r"[^a-zA-Z0-9_-]")


class ModelOpsError(RuntimeError):
    """An operator action could not be done; the message says why."""


@dataclass(frozen=True)
class PushResult:
    """What :meth:`ModelOps.push` created."""

    job_id: str
    job_arn: str
    document: dict[str, Any]
    model_key: str
    manifest_key: str


@dataclass(frozen=True)
class ExecutionRow:
    """One relay's execution of a job, with what it reported."""

    thing: str
    status: str
    details: dict[str, str]

    @property
    def running_version(self) -> str:
        """The model version the relay said runs ("" if it did not say)."""
        return self.details.get("running_version", "")


@dataclass(frozen=True)
class JobStatus:
    """A job's summary and every relay's execution."""

    job_id: str
    status: str
    model: str
    version: str
    process: dict[str, int]
    comment: str
    reason_code: str
    executions: list[ExecutionRow]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "job_id": self.job_id,
            "status": self.status,
            "model": self.model,
            "version": self.version,
            "process": self.process,
            "comment": self.comment,
            "reason_code": self.reason_code,
            "executions": [
                {"thing": e.thing, "status": e.status, **e.details}
                for e in self.executions
            ],
        }


def presigned_placeholder(region: str, bucket: str, key: str) -> str:
    """The IoT Jobs placeholder that AWS replaces with a presigned GET URL."""
    return f"${{aws:iot:s3-presigned-url:https://s3.{region}.amazonaws.com/{bucket}/{key}}}"


def job_id_for(model: str, version: str, now: float | None = None) -> str:
    """A unique job id (see the module doc)."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    tail = f"-{stamp}-{secrets.token_hex(2)}"
    body = _JOB_ID_BAD.sub("_", f"{model}-{version}")
    return (JOB_PREFIX + body)[: 64 - len(tail)] + tail


def _read_file(what: str, path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ModelOpsError(
            f"cannot read the {what} file {path}: {exc.strerror or exc}"
        ) from exc


class ModelOps:
    """Operator actions over boto3 ``iot`` and ``s3`` clients."""

    def __init__(self, iot: Any, s3: Any, region: str) -> None:
        self.iot = iot
        self.s3 = s3
        self.region = region

    # -- push ---------------------------------------------------------------
    def group_arn(self, group: str) -> str:
        """The ARN of a thing group; ModelOpsError if it does not exist."""
        try:
            return str(
                self.iot.describe_thing_group(thingGroupName=group)["thingGroupArn"]
            )
        except self.iot.exceptions.ResourceNotFoundException as exc:
            raise ModelOpsError(f"thing group {group!r} does not exist") from exc

    def push(
        self,
        model_path: Path,
        manifest_path: Path,
        *,
        group: str,
        bucket: str,
        private_key: Ed25519PrivateKey,
        prefix: str = "models",
        presign_role_arn: str | None = None,
        url_expiry_s: int = 3600,
        s3_direct: bool = False,
        rollout: RolloutSettings | None = None,
        continuous: bool = False,
        description: str | None = None,
    ) -> PushResult:
        """Upload, sign and create the job (see the module doc).

        Raises :class:`ModelOpsError` naming the file when the model or the
        manifest cannot be read (checked before any other setting).
        """
        # The files first: a missing model is the mistake to report, not
        # the rollout settings.
        manifest_bytes = _read_file("manifest", manifest_path)
        model_bytes = _read_file("model", model_path)
        if not s3_direct and not presign_role_arn:
            raise ModelOpsError(
                "presigned downloads need presign_role_arn (an IAM role AWS IoT may "
                "assume to read the bucket); or use s3_direct"
            )
        try:
            manifest = json.loads(manifest_bytes)
            name, version = str(manifest["name"]), str(manifest["version"])
            model_file = str(manifest["model_file"])
            want_sha, want_size = str(manifest["sha256"]), int(manifest["bytes"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelOpsError(
                f"{manifest_path}: not a model manifest ({exc})"
            ) from exc
        sha = hashlib.sha256(model_bytes).hexdigest()
        if (sha, len(model_bytes)) != (want_sha, want_size):
            raise ModelOpsError(
                f"{model_path} is {len(model_bytes)} bytes sha256 {sha[:12]}..., "
                f"the manifest says {want_size} bytes {want_sha[:12]}..."
            )
        base = f"{prefix.strip('/')}/{name}/{version}/{sha[:12]}"
        model_key, manifest_key = f"{base}/{model_file}", f"{base}/manifest.json"
        signature, signer = sign(private_key, manifest_bytes)
        self.s3.put_object(Bucket=bucket, Key=model_key, Body=model_bytes)
        self.s3.put_object(Bucket=bucket, Key=manifest_key, Body=manifest_bytes)
        self.s3.put_object(
            Bucket=bucket, Key=f"{manifest_key}.sig", Body=(signature + "\n").encode()
        )
        if s3_direct:
            model_src = Source(bucket=bucket, key=model_key)
            manifest_src = Source(bucket=bucket, key=manifest_key)
        else:
            model_src = Source(
                url=presigned_placeholder(self.region, bucket, model_key)
            )
            manifest_src = Source(
                url=presigned_placeholder(self.region, bucket, manifest_key)
            )
        doc = ModelJobDocument(
            model=name,
            version=version,
            sha256=sha,
            size=len(model_bytes),
            manifest_sha256=hashlib.sha256(manifest_bytes).hexdigest(),
            manifest_size=len(manifest_bytes),
            signature=signature,
            key_id=signer,
            model_source=model_src,
            manifest_source=manifest_src,
        ).to_dict()
        # The relay's own check, before any relay sees it.
        parse_document(doc, allow_placeholders=True)
        job_id, arn = self.create_job(
            doc,
            group=group,
            presign_role_arn=None if s3_direct else presign_role_arn,
            url_expiry_s=url_expiry_s,
            rollout=rollout,
            continuous=continuous,
            description=description or f"install {name} {version}",
        )
        return PushResult(job_id, arn, doc, model_key, manifest_key)

    def create_job(
        self,
        document: dict[str, Any],
        *,
        group: str,
        presign_role_arn: str | None = None,
        url_expiry_s: int = 3600,
        rollout: RolloutSettings | None = None,
        continuous: bool = False,
        description: str | None = None,
        job_id: str | None = None,
    ) -> tuple[str, str]:
        """Create a model job from a ready document; returns (job id, ARN)."""
        kwargs: dict[str, Any] = {
            "jobId": job_id
            or job_id_for(str(document.get("model")), str(document.get("version"))),
            "targets": [self.group_arn(group)],
            "document": json.dumps(document, separators=(",", ":")),
            "targetSelection": "CONTINUOUS" if continuous else "SNAPSHOT",
            **(rollout or RolloutSettings()).create_job_arguments(),
        }
        if description:
            kwargs["description"] = description[:2028]
        if presign_role_arn:
            kwargs["presignedUrlConfig"] = {
                "roleArn": presign_role_arn,
                "expiresInSec": url_expiry_s,
            }
        try:
            answer = self.iot.create_job(**kwargs)
        except botocore.exceptions.ClientError as exc:
            raise ModelOpsError(f"CreateJob refused: {exc}") from exc
        log.info(
            "model_job_created",
            job_id=kwargs["jobId"],
            group=group,
            version=document.get("version"),
        )
        return str(answer["jobId"]), str(answer["jobArn"])

    # -- status -----------------------------------------------------------
    def _document(self, job_id: str) -> dict[str, Any]:
        raw = self.iot.get_job_document(jobId=job_id)["document"]
        try:
            doc = json.loads(raw)
        except ValueError:
            return {}
        return doc if isinstance(doc, dict) else {}

    def _executions(self, job_id: str) -> Iterator[dict[str, Any]]:
        kwargs: dict[str, Any] = {"jobId": job_id, "maxResults": 250}
        while True:
            page = self.iot.list_job_executions_for_job(**kwargs)
            yield from page.get("executionSummaries", [])
            token = page.get("nextToken")
            if not token:
                return
            kwargs["nextToken"] = token

    def status(self, job_id: str) -> JobStatus:
        """The job and each relay's execution state and reported version."""
        try:
            job = self.iot.describe_job(jobId=job_id)["job"]
        except self.iot.exceptions.ResourceNotFoundException as exc:
            raise ModelOpsError(f"no job {job_id!r}") from exc
        doc = self._document(job_id)
        rows = []
        for summary in self._executions(job_id):
            thing = str(summary["thingArn"]).rsplit("/", 1)[-1]
            execution = self.iot.describe_job_execution(jobId=job_id, thingName=thing)[
                "execution"
            ]
            details = execution.get("statusDetails", {}).get("detailsMap", {}) or {}
            rows.append(ExecutionRow(thing, str(execution["status"]), dict(details)))
        rows.sort(key=lambda r: r.thing)
        return JobStatus(
            job_id=job_id,
            status=str(job["status"]),
            model=str(doc.get("model", "")),
            version=str(doc.get("version", "")),
            process=dict(job.get("jobProcessDetails", {})),
            comment=str(job.get("comment", "")),
            reason_code=str(job.get("reasonCode", "")),
            executions=rows,
        )

    # -- cancel / rollback ----------------------------------------------------
    def cancel(
        self, job_id: str, force: bool = False, comment: str | None = None
    ) -> None:
        """Cancel a job: QUEUED executions stop; IN_PROGRESS ones only with force."""
        kwargs: dict[str, Any] = {"jobId": job_id, "force": force}
        if comment:
            kwargs["comment"] = comment[:2028]
        try:
            self.iot.cancel_job(**kwargs)
        except botocore.exceptions.ClientError as exc:
            raise ModelOpsError(f"CancelJob {job_id}: {exc}") from exc

    def model_jobs(self, group: str) -> list[dict[str, Any]]:
        """The model jobs targeting ``group``, oldest first.

        Each entry: ``job_id``, ``status``, ``created`` (datetime),
        ``succeeded`` (count), ``document`` (dict), ``presign`` (config).
        """
        arn = self.group_arn(group)
        out = []
        kwargs: dict[str, Any] = {"maxResults": 250}
        while True:
            page = self.iot.list_jobs(**kwargs)
            for summary in page.get("jobs", []):
                job_id = str(summary["jobId"])
                if not job_id.startswith(JOB_PREFIX):
                    continue
                job = self.iot.describe_job(jobId=job_id)["job"]
                if arn not in job.get("targets", []):
                    continue
                doc = self._document(job_id)
                if not is_model_document(doc):
                    continue
                out.append(
                    {
                        "job_id": job_id,
                        "status": str(job["status"]),
                        "created": job["createdAt"],
                        "succeeded": int(
                            job.get("jobProcessDetails", {}).get(
                                "numberOfSucceededThings", 0
                            )
                        ),
                        "document": doc,
                        "presign": job.get("presignedUrlConfig") or {},
                    }
                )
            token = page.get("nextToken")
            if not token:
                break
            kwargs["nextToken"] = token
        out.sort(key=lambda j: (j["created"], j["job_id"]))
        return out

    def rollback(
        self,
        group: str,
        *,
        to_version: str | None = None,
        cancel_current: bool = True,
        rollout: RolloutSettings | None = None,
    ) -> tuple[str, str]:
        """A new job re-installing the previous version; returns (job id, version).

        The current rollout is the group's newest model job; with
        ``cancel_current`` it is canceled first (queued relays stop; a relay
        mid-install finishes, then takes the rollback).
        """
        jobs = self.model_jobs(group)
        if not jobs:
            raise ModelOpsError(f"no model job ever targeted group {group!r}")
        current = jobs[-1]
        current_version = current["document"].get("version")
        earlier = jobs[:-1]
        if to_version is not None:
            chosen = [j for j in earlier if j["document"].get("version") == to_version]
        else:
            chosen = [
                j
                for j in earlier
                if j["document"].get("version") != current_version and j["succeeded"]
            ]
        if not chosen:
            wanted = to_version or f"a version other than {current_version}"
            raise ModelOpsError(
                f"no earlier model job for group {group!r} installed {wanted}"
            )
        previous = chosen[-1]
        doc = previous["document"]
        try:
            parse_document(doc, allow_placeholders=True)
        except ModelRejectedError as exc:
            raise ModelOpsError(f"job {previous['job_id']}: {exc}") from exc
        if cancel_current and current["status"] == "IN_PROGRESS":
            self.cancel(
                current["job_id"],
                comment=f"rolled back to {doc.get('version')}",
            )
        presign = previous["presign"]
        job_id, _arn = self.create_job(
            doc,
            group=group,
            presign_role_arn=presign.get("roleArn"),
            url_expiry_s=int(presign.get("expiresInSec", 3600)),
            rollout=rollout,
            description=f"rollback of {current['job_id']} to {doc.get('version')}",
            job_id=job_id_for(f"{doc.get('model')}", f"{doc.get('version')}-rb"),
        )
        return job_id, str(doc.get("version"))
