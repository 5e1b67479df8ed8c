"""Configuration of the Kinesis shipper and the boto3 client it uses.

Credentials are never part of the configuration: the client takes them
from boto3's normal chain (environment, shared files with ``profile``,
container or instance role).  Where to send:

* AWS commercial: ``region="eu-west-1"`` (partition ``aws``);
* AWS GovCloud: ``region="us-gov-west-1"`` or ``"us-gov-east-1"``
  (partition ``aws-us-gov``; its Kinesis endpoints are already FIPS
  endpoints);
* a local server (MiniStack, moto): ``endpoint_url="http://127.0.0.1:4566"``
  plus any region, which only scopes the server's state and the signature.

``partition`` is an optional guard: when set, a region outside it is a
configuration error, so a GovCloud relay cannot silently ship to a
commercial region.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import boto3
import botocore.config
import botocore.exceptions

#: Kinesis PutRecords limits (per the API reference, 2024): records per
#: call, bytes per call and bytes per record, partition keys included.
KINESIS_MAX_RECORDS_PER_CALL = 500
KINESIS_MAX_BYTES_PER_CALL = 5 * 1024 * 1024
KINESIS_MAX_RECORD_BYTES = 1024 * 1024

_REGION_RE = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")
_STREAM_NAME_RE = re.compile(r"^[a-zA-Z0-9_.-]{1,128}$")
_STREAM_ARN_RE = re.compile(
    r"^arn:(?P<partition>aws[a-z-]*):kinesis:(?P<region>[a-z0-9-]+):"
    r"(?P<account>\d{12}):stream/(?P<name>[a-zA-Z0-9_.-]{1,128})$"
)
#: Region used to sign requests to a local endpoint when none is given.
LOCAL_DEFAULT_REGION = "us-east-1"


class ShipperConfigError(ValueError):
    """Raised for an invalid shipper setting; names the key and the rule."""

    def __init__(self, key: str, value: object, rule: str) -> None:
        super().__init__(f"ship.{key}={value!r}: {rule}")
        self.key = key


@dataclass(frozen=True)
class ShipperConfig:
    """Where and how the shipper sends spooled batches to Kinesis.

    Sizes are bytes, times seconds.  ``strict_key_order`` keeps the first
    arrival of each partition key's batches in seq order: a call carries
    at most one batch per key, and a key's next batch is only sent once
    the previous one is acknowledged.  Turning it off packs calls fully
    (faster replay of a one-exporter backlog) at the price of reordering
    after partial failures.
    """

    stream_name: str | None = None
    stream_arn: str | None = None
    #: None: boto3's chain (AWS_REGION, AWS_DEFAULT_REGION, config file)
    region: str | None = None
    endpoint_url: str | None = None
    partition: str | None = None
    use_fips_endpoint: bool = False
    profile: str | None = None
    max_records_per_call: int = KINESIS_MAX_RECORDS_PER_CALL
    max_bytes_per_call: int = KINESIS_MAX_BYTES_PER_CALL
    max_record_bytes: int = KINESIS_MAX_RECORD_BYTES
    #: payload bytes loaded from the spool and not yet acknowledged; the
    #: process holds about three times this (JSON base64 of the request)
    max_in_flight_bytes: int = 2 * KINESIS_MAX_BYTES_PER_CALL
    max_concurrent_calls: int = 1
    strict_key_order: bool = True
    #: record-level retries: full-jitter exponential backoff between rounds
    backoff_base_s: float = 0.1
    backoff_max_s: float = 20.0
    #: transport-level retries (botocore "standard" mode, attempts per call)
    transport_max_attempts: int = 3
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    #: how often an idle shipper looks at the spool without a notify()
    idle_poll_s: float = 0.5
    summary_interval_s: float = 60.0

    def __post_init__(self) -> None:
        if self.stream_name is None and self.stream_arn is None:
            raise ShipperConfigError(
                "stream_name", None, "set stream_name or stream_arn"
            )
        if self.stream_name is not None and not _STREAM_NAME_RE.match(self.stream_name):
            raise ShipperConfigError(
                "stream_name",
                self.stream_name,
                "1 to 128 characters of a-z A-Z 0-9 _ . -",
            )
        if self.region is not None and not _REGION_RE.match(self.region):
            raise ShipperConfigError(
                "region", self.region, "an AWS region name such as us-gov-west-1"
            )
        if self.endpoint_url is not None:
            parts = urlsplit(self.endpoint_url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ShipperConfigError(
                    "endpoint_url", self.endpoint_url, "an http:// or https:// URL"
                )
        if self.stream_arn is not None:
            self._check_arn(self.stream_arn)
        if self.partition is not None and self.region is not None:
            self._check_partition(self.region, self.partition)
        for key, low, high in (
            ("max_records_per_call", 1, KINESIS_MAX_RECORDS_PER_CALL),
            ("max_record_bytes", 2, None),
            ("max_bytes_per_call", 2, None),
            ("max_concurrent_calls", 1, 64),
            ("transport_max_attempts", 1, 20),
        ):
            value = getattr(self, key)
            if value < low or (high is not None and value > high):
                bound = f"{low}..{high}" if high is not None else f">= {low}"
                raise ShipperConfigError(key, value, f"must be {bound}")
        if self.max_record_bytes > self.max_bytes_per_call:
            raise ShipperConfigError(
                "max_record_bytes",
                self.max_record_bytes,
                f"must be <= max_bytes_per_call ({self.max_bytes_per_call})",
            )
        if self.max_in_flight_bytes < self.max_bytes_per_call:
            raise ShipperConfigError(
                "max_in_flight_bytes",
                self.max_in_flight_bytes,
                f"must be >= max_bytes_per_call ({self.max_bytes_per_call})",
            )
        for key in (
            "backoff_base_s",
            "backoff_max_s",
            "connect_timeout_s",
            "read_timeout_s",
            "idle_poll_s",
            "summary_interval_s",
        ):
            if not getattr(self, key) > 0:
                raise ShipperConfigError(key, getattr(self, key), "must be > 0")
        if self.backoff_max_s < self.backoff_base_s:
            raise ShipperConfigError(
                "backoff_max_s",
                self.backoff_max_s,
                f"must be >= backoff_base_s ({self.backoff_base_s})",
            )

    def _check_arn(self, arn: str) -> None:
        match = _STREAM_ARN_RE.match(arn)
        if match is None:
            raise ShipperConfigError(
                "stream_arn",
                arn,
                "arn:PARTITION:kinesis:REGION:ACCOUNT:stream/NAME",
            )
        if self.region is not None and match["region"] != self.region:
            raise ShipperConfigError(
                "stream_arn", arn, f"its region is not region={self.region!r}"
            )
        if self.partition is not None and match["partition"] != self.partition:
            raise ShipperConfigError(
                "stream_arn", arn, f"its partition is not partition={self.partition!r}"
            )
        if self.stream_name is not None and match["name"] != self.stream_name:
            raise ShipperConfigError(
                "stream_arn", arn, f"names another stream than {self.stream_name!r}"
            )

    @staticmethod
    def _check_partition(region: str, partition: str) -> None:
        try:
            found = boto3.session.Session().get_partition_for_region(region)
        except botocore.exceptions.UnknownRegionError as exc:
            raise ShipperConfigError(
                "region", region, "not a region of any AWS partition"
            ) from exc
        if found != partition:
            raise ShipperConfigError(
                "region",
                region,
                f"is in partition {found}, not partition={partition!r}",
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ShipperConfig:
        """Build a config from parsed settings (a ``[ship]`` table, say).

        Unknown keys are an error naming the valid ones.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ShipperConfigError(
                unknown[0],
                values[unknown[0]],
                f"unknown key; valid keys: {', '.join(sorted(known))}",
            )
        return cls(**dict(values))

    def stream_params(self) -> dict[str, str]:
        """The stream-identifying parameters of a Kinesis call."""
        if self.stream_arn is not None:
            return {"StreamARN": self.stream_arn}
        assert self.stream_name is not None
        return {"StreamName": self.stream_name}

    @property
    def stream_label(self) -> str:
        """The stream's name (from the ARN if that is all there is), for logs."""
        if self.stream_name is not None:
            return self.stream_name
        assert self.stream_arn is not None
        return self.stream_arn.rsplit("/", 1)[-1]


def make_kinesis_client(config: ShipperConfig) -> Any:
    """Return a boto3 Kinesis client for ``config``.

    The region comes from ``config.region`` or boto3's chain; a local
    ``endpoint_url`` without any region signs for
    :data:`LOCAL_DEFAULT_REGION`.  Transport-level failures (connection
    errors, HTTP 5xx, call-level throttling) are retried by botocore's
    "standard" mode with its own jittered backoff and retry quota; what is
    left after ``transport_max_attempts`` reaches the shipper.
    """
    session = boto3.session.Session(
        profile_name=config.profile, region_name=config.region
    )
    region = session.region_name
    if region is None:
        if config.endpoint_url is None:
            raise ShipperConfigError(
                "region",
                None,
                "no region configured (set ship.region or AWS_REGION)",
            )
        region = LOCAL_DEFAULT_REGION
    if config.partition is not None and config.endpoint_url is None:
        ShipperConfig._check_partition(region, config.partition)
    client_config = botocore.config.Config(
        region_name=region,
        retries={
            "mode": "standard",
            "total_max_attempts": config.transport_max_attempts,
        },
        connect_timeout=config.connect_timeout_s,
        read_timeout=config.read_timeout_s,
        max_pool_connections=max(2, config.max_concurrent_calls),
        use_fips_endpoint=config.use_fips_endpoint,
        tcp_keepalive=True,
        user_agent_extra="sampleflow-relay",
    )
    return session.client(
        "kinesis", endpoint_url=config.endpoint_url, config=client_config
    )
