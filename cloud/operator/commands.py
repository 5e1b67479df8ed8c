"""``sampleflow models keygen|push|status|cancel|rollback``.

Plugged in by the ``sampleflow.commands`` entry point
``models-ops = "cloud.operator.commands:register"``, which adds these
actions to the ``models`` command that :mod:`cloud.training.commands`
owns (through its :func:`~cloud.training.commands.models_subparsers`).

AWS credentials and region come from boto3's normal chain; ``--region``
and ``--endpoint-url`` (a local server) override them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import boto3
from botocore.exceptions import (
    BotoCoreError,
    EndpointConnectionError,
    NoCredentialsError,
)

from cloud.operator.keys import generate_keypair, load_private_key
from cloud.operator.ops import JobStatus, ModelOps, ModelOpsError
from cloud.operator.rollout import (
    ABORT_TYPES,
    STEP_ON,
    RolloutSettings,
    RolloutSettingsError,
)
from cloud.training.commands import models_subparsers


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Entry point: add the operator actions to ``sampleflow models``."""
    register_model_ops(models_subparsers(subparsers))


def _aws_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--region", default=None, help="AWS region (boto3 default)")
    parser.add_argument(
        "--endpoint-url", default=None, help="a local AWS server, e.g. MiniStack"
    )


def _rollout_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("rollout")
    g.add_argument("--max-per-minute", type=int, help="relays notified per minute")
    g.add_argument(
        "--exponential",
        metavar="BASE:FACTOR:STEP",
        help="start at BASE/min, x FACTOR every STEP relays (see --step-on)",
    )
    g.add_argument("--step-on", choices=STEP_ON, default="succeeded")
    g.add_argument(
        "--abort-percent", type=float, help="cancel at this %% of failed executions"
    )
    g.add_argument(
        "--abort-min", type=int, default=1, help="...once this many finished (1)"
    )
    g.add_argument("--abort-on", choices=ABORT_TYPES, default="FAILED")
    g.add_argument(
        "--timeout-minutes", type=int, help="IN_PROGRESS longer than this: TIMED_OUT"
    )


def register_model_ops(actions: argparse._SubParsersAction[Any]) -> None:
    """Add keygen, push, status, cancel and rollback to ``models``."""
    keygen = actions.add_parser("keygen", help="create the model-signing key pair")
    keygen.add_argument("--private", type=Path, required=True, help="PEM, mode 0600")
    keygen.add_argument("--public", type=Path, required=True, help="for the relays")
    keygen.set_defaults(func=run_keygen)

    push = actions.add_parser(
        "push",
        help="upload, sign and roll out a relay model to a thing group",
        description="Uploads MODEL and MANIFEST to S3, signs the manifest with "
        "the Ed25519 key and creates an AWS IoT job for the thing group.",
    )
    push.add_argument("model", type=Path, help="<name>.tflite")
    push.add_argument("manifest", type=Path, help="<name>.manifest.json")
    push.add_argument("--group", required=True, help="thing group (tenant or all)")
    push.add_argument("--bucket", required=True, help="S3 bucket for the artifacts")
    push.add_argument("--prefix", default="models", help="S3 key prefix (models)")
    push.add_argument("--key", type=Path, required=True, help="private signing key")
    push.add_argument(
        "--presign-role-arn",
        help="IAM role AWS IoT assumes to presign S3 URLs for the relays",
    )
    push.add_argument(
        "--url-expiry", type=int, default=3600, help="presigned URL life in s (3600)"
    )
    push.add_argument(
        "--s3-direct",
        action="store_true",
        help="name bucket/key instead; relays read with their own credentials",
    )
    push.add_argument(
        "--continuous",
        action="store_true",
        help="relays that join the group later get the job too",
    )
    push.add_argument("--description", default=None)
    _rollout_flags(push)
    _aws_flags(push)
    push.set_defaults(func=run_push)

    status = actions.add_parser("status", help="a job's state per relay")
    status.add_argument("job_id")
    status.add_argument("--json", action="store_true", help="print JSON")
    _aws_flags(status)
    status.set_defaults(func=run_status)

    cancel = actions.add_parser("cancel", help="cancel a model job")
    cancel.add_argument("job_id")
    cancel.add_argument(
        "--force", action="store_true", help="also cancel IN_PROGRESS executions"
    )
    cancel.add_argument("--comment", default=None)
    _aws_flags(cancel)
    cancel.set_defaults(func=run_cancel)

    rollback = actions.add_parser(
        "rollback", help="re-install the group's previous model version"
    )
    rollback.add_argument("--group", required=True)
    rollback.add_argument("--to-version", default=None, help="default: previous")
    rollback.add_argument(
        "--keep-current", action="store_true", help="do not cancel the current job"
    )
    _rollout_flags(rollback)
    _aws_flags(rollback)
    rollback.set_defaults(func=run_rollback)


def _ops(args: argparse.Namespace) -> ModelOps:
    session = boto3.session.Session(region_name=args.region)
    region = session.region_name or "us-east-1"
    return ModelOps(
        session.client("iot", region_name=region, endpoint_url=args.endpoint_url),
        session.client("s3", region_name=region, endpoint_url=args.endpoint_url),
        region,
    )


def _rollout(args: argparse.Namespace) -> RolloutSettings:
    base = factor = step = None
    if args.exponential:
        try:
            b, f, s = args.exponential.split(":")
            base, factor, step = int(b), float(f), int(s)
        except ValueError as exc:
            raise RolloutSettingsError(
                "--exponential", args.exponential, "must be BASE:FACTOR:STEP"
            ) from exc
    return RolloutSettings(
        max_per_minute=args.max_per_minute,
        base_per_minute=base,
        increment_factor=factor,
        step_things=step,
        step_on=args.step_on,
        abort_percent=args.abort_percent,
        abort_min_executed=args.abort_min,
        abort_on=args.abort_on,
        timeout_minutes=args.timeout_minutes,
    )


def _aws_error(exc: BotoCoreError) -> str:
    """What went wrong talking to AWS, with the knob to turn."""
    if isinstance(exc, NoCredentialsError):
        return (
            f"{exc} (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
        )
    if isinstance(exc, EndpointConnectionError):
        return f"{exc} (check --endpoint-url and --region)"
    return str(exc)


def _fail(message: str, args: argparse.Namespace) -> int:
    action = getattr(args, "models_action", None) or ""
    print(f"sampleflow models {action}: error: {message}", file=sys.stderr)
    return 1


def run_keygen(args: argparse.Namespace) -> int:
    """``models keygen``."""
    try:
        kid = generate_keypair(args.private, args.public)
    except OSError as exc:
        return _fail(str(exc), args)
    print(f"key id {kid}: private {args.private}, public {args.public}")
    return 0


def run_push(args: argparse.Namespace) -> int:
    """``models push``."""
    # The model files before the key and the AWS settings: they are what
    # the command is about (ModelOps.push reads them first too).
    for what, path in (("model", args.model), ("manifest", args.manifest)):
        if not Path(path).is_file():
            return _fail(f"no {what} file {path}", args)
    try:
        result = _ops(args).push(
            args.model,
            args.manifest,
            group=args.group,
            bucket=args.bucket,
            prefix=args.prefix,
            private_key=load_private_key(args.key),
            presign_role_arn=args.presign_role_arn,
            url_expiry_s=args.url_expiry,
            s3_direct=args.s3_direct,
            rollout=_rollout(args),
            continuous=args.continuous,
            description=args.description,
        )
    except (ModelOpsError, RolloutSettingsError, ValueError, OSError) as exc:
        return _fail(str(exc), args)
    except BotoCoreError as exc:
        return _fail(_aws_error(exc), args)
    print(result.job_id)
    return 0


def format_status(status: JobStatus) -> str:
    """The human table of ``models status``."""
    lines = [
        f"job {status.job_id}: {status.status}  model {status.model} {status.version}",
    ]
    if status.comment or status.reason_code:
        lines.append(f"  {status.reason_code} {status.comment}".rstrip())
    lines.append(f"  {'relay':<32} {'state':<12} {'runs':<10} reason")
    for e in status.executions:
        reason = e.details.get("reason", "")
        if e.details.get("detail"):
            reason += f" ({e.details['detail']})"
        lines.append(
            f"  {e.thing:<32} {e.status:<12} {e.running_version or '-':<10} {reason}"
        )
    return "\n".join(lines)


def run_status(args: argparse.Namespace) -> int:
    """``models status``."""
    try:
        status = _ops(args).status(args.job_id)
    except ModelOpsError as exc:
        return _fail(str(exc), args)
    except BotoCoreError as exc:
        return _fail(_aws_error(exc), args)
    if args.json:
        print(json.dumps(status.to_dict(), indent=2))
    else:
        print(format_status(status))
    return 0


def run_cancel(args: argparse.Namespace) -> int:
    """``models cancel``."""
    try:
        _ops(args).cancel(args.job_id, force=args.force, comment=args.comment)
    except ModelOpsError as exc:
        return _fail(str(exc), args)
    except BotoCoreError as exc:
        return _fail(_aws_error(exc), args)
    print(f"canceled {args.job_id}")
    return 0


def run_rollback(args: argparse.Namespace) -> int:
    """``models rollback``."""
    try:
        job_id, version = _ops(args).rollback(
            args.group,
            to_version=args.to_version,
            cancel_current=not args.keep_current,
            rollout=_rollout(args),
        )
    except (ModelOpsError, RolloutSettingsError) as exc:
        return _fail(str(exc), args)
    except BotoCoreError as exc:
        return _fail(_aws_error(exc), args)
    print(f"{job_id} (version {version})")
    return 0
