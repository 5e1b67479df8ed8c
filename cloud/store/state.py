"""Per-tenant state in DynamoDB, updated atomically (boto3).

One table, key ``tenant_id`` (hash) + ``item`` (range), one item per thing:

==========================  =================================================
``item``                    attributes
==========================  =================================================
``relay#<relay id>``        ``last_seen_ms``
``exporter#<address>``      ``last_seen_ms``, ``relay_id`` (the relay that
                            saw it last)
``rates``                   ``record_rate_per_s``, ``effective_sampling_rate``,
                            ``records_total``, ``rates_micro_batch``,
                            ``rates_at_ms``
``model``                   ``model_version``, ``model_at_ms``
==========================  =================================================

Every update is one ``UpdateItem`` with a ``ConditionExpression``, never a
read-modify-write, so concurrent engines (or a replayed micro-batch) cannot
move state backwards:

* last-seen times and the model version only move forward in time;
* rates are written once per micro-batch id: a replay of the same (or an
  older) micro-batch is refused, so ``records_total`` (an atomic ``ADD``)
  counts each micro-batch once.

A refused update returns ``False`` and is counted in
:attr:`TenantStateStore.stale`; it is the expected outcome of a race or a
replay, not an error.  Times are ms since the UNIX epoch, UTC.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import botocore.exceptions
import structlog

log = structlog.get_logger(__name__)

DEFAULT_TABLE = "sampleflow-tenant-state"
_RELAY = "relay#"
_EXPORTER = "exporter#"
_RATES = "rates"
_MODEL = "model"


class StateStoreError(Exception):
    """Raised when DynamoDB fails a request for another reason than a
    refused condition (throttling after boto3's retries, a missing table,
    bad credentials); the message carries DynamoDB's error code."""


@dataclass(frozen=True)
class TenantState:
    """Everything stored for one tenant (``None``: never written)."""

    tenant_id: str
    relays_last_seen_ms: dict[str, int] = field(default_factory=dict)
    exporters_last_seen_ms: dict[str, int] = field(default_factory=dict)
    exporter_relay: dict[str, str] = field(default_factory=dict)
    record_rate_per_s: float | None = None
    effective_sampling_rate: float | None = None
    records_total: int = 0
    rates_micro_batch: int | None = None
    rates_at_ms: int | None = None
    model_version: str | None = None
    model_at_ms: int | None = None


def _num(value: float | int) -> dict[str, str]:
    # DynamoDB numbers travel as decimal strings; repr keeps a float exact.
    return {"N": repr(value) if isinstance(value, float) else str(int(value))}


class TenantStateStore:
    """The per-tenant state table (see the module doc).

    ``client`` is a boto3 DynamoDB client (``endpoint_url`` for a local
    server).  Inert until used; thread-safe as boto3 clients are.
    """

    def __init__(self, client: Any, table_name: str = DEFAULT_TABLE) -> None:
        self.client = client
        self.table_name = table_name
        #: Refused (stale or replayed) updates by kind.
        self.stale: collections.Counter[str] = collections.Counter()

    def create_table(self, timeout_s: float = 60.0) -> bool:
        """Create the table on-demand if it does not exist; wait until ACTIVE.

        Returns True when this call created it.  Safe to call at every start.
        """
        created = True
        try:
            self.client.create_table(
                TableName=self.table_name,
                KeySchema=[
                    {"AttributeName": "tenant_id", "KeyType": "HASH"},
                    {"AttributeName": "item", "KeyType": "RANGE"},
                ],
                AttributeDefinitions=[
                    {"AttributeName": "tenant_id", "AttributeType": "S"},
                    {"AttributeName": "item", "AttributeType": "S"},
                ],
                BillingMode="PAY_PER_REQUEST",
            )
            log.info("state_table_created", table=self.table_name)
        except botocore.exceptions.ClientError as exc:
            if exc.response["Error"]["Code"] != "ResourceInUseException":
                raise StateStoreError(
                    f"cannot create table {self.table_name}: {exc}"
                ) from exc
            created = False
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.client.describe_table(TableName=self.table_name)["Table"][
                "TableStatus"
            ]
            if status == "ACTIVE":
                return created
            if time.monotonic() > deadline:
                raise StateStoreError(
                    f"table {self.table_name} still {status} after {timeout_s}s"
                )
            time.sleep(0.2)

    def touch_relay(self, tenant_id: str, relay_id: str, seen_ms: int) -> bool:
        """Set the relay's last-seen time if ``seen_ms`` is later than the
        stored one; return whether it was."""
        return self._update(
            "relay",
            tenant_id,
            _RELAY + relay_id,
            expression="SET last_seen_ms = :t",
            condition="attribute_not_exists(last_seen_ms) OR last_seen_ms < :t",
            values={":t": _num(seen_ms)},
        )

    def touch_exporter(
        self, tenant_id: str, exporter: str, seen_ms: int, relay_id: str
    ) -> bool:
        """Set the exporter's last-seen time (and the relay that saw it) if
        ``seen_ms`` is later than the stored one; return whether it was."""
        return self._update(
            "exporter",
            tenant_id,
            _EXPORTER + exporter,
            expression="SET last_seen_ms = :t, relay_id = :r",
            condition="attribute_not_exists(last_seen_ms) OR last_seen_ms < :t",
            values={":t": _num(seen_ms), ":r": {"S": relay_id}},
        )

    def touch_many(
        self,
        tenant_id: str,
        relays_seen_ms: Mapping[str, int],
        exporters_seen_ms: Mapping[tuple[str, str], int],
    ) -> int:
        """:meth:`touch_relay` and :meth:`touch_exporter` for one micro-batch.

        ``exporters_seen_ms`` is keyed (exporter, relay id).  DynamoDB has no
        conditional batch update, so this is one request per item; returns
        how many moved forward.
        """
        moved = sum(
            self.touch_relay(tenant_id, relay, t) for relay, t in relays_seen_ms.items()
        )
        moved += sum(
            self.touch_exporter(tenant_id, exporter, t, relay)
            for (exporter, relay), t in exporters_seen_ms.items()
        )
        return moved

    def update_rates(
        self,
        tenant_id: str,
        micro_batch: int,
        *,
        at_ms: int,
        records: int,
        record_rate_per_s: float,
        effective_sampling_rate: float,
    ) -> bool:
        """Record one micro-batch's rates and add its records to the total.

        ``record_rate_per_s``: incoming flow records per second;
        ``effective_sampling_rate``: the 1-in-N rate that applies to the
        tenant's traffic now (the engine's estimate).  Refused (False) when
        a micro-batch with this or a later id was already recorded.
        """
        return self._update(
            "rates",
            tenant_id,
            _RATES,
            expression=(
                "SET record_rate_per_s = :rate, effective_sampling_rate = :n, "
                "rates_micro_batch = :b, rates_at_ms = :t ADD records_total :records"
            ),
            condition=(
                "attribute_not_exists(rates_micro_batch) OR rates_micro_batch < :b"
            ),
            values={
                ":rate": _num(float(record_rate_per_s)),
                ":n": _num(float(effective_sampling_rate)),
                ":b": _num(micro_batch),
                ":t": _num(at_ms),
                ":records": _num(records),
            },
        )

    def set_model_version(self, tenant_id: str, version: str, at_ms: int) -> bool:
        """Set the tenant's model version if ``at_ms`` is later than the time
        of the stored one (an older answer cannot win); return whether it was."""
        return self._update(
            "model",
            tenant_id,
            _MODEL,
            expression="SET model_version = :v, model_at_ms = :t",
            condition="attribute_not_exists(model_at_ms) OR model_at_ms < :t",
            values={":v": {"S": version}, ":t": _num(at_ms)},
        )

    def tenant_state(self, tenant_id: str) -> TenantState:
        """Read every item of the tenant (one consistent Query, all pages)."""
        items: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {
            "TableName": self.table_name,
            "KeyConditionExpression": "tenant_id = :p",
            "ExpressionAttributeValues": {":p": {"S": tenant_id}},
            "ConsistentRead": True,
        }
        try:
            while True:
                page = self.client.query(**kwargs)
                items.extend(page["Items"])
                if "LastEvaluatedKey" not in page:
                    break
                kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]
        except botocore.exceptions.ClientError as exc:
            raise StateStoreError(f"cannot read state of {tenant_id}: {exc}") from exc
        values: dict[str, Any] = {}
        relays: dict[str, int] = {}
        exporters: dict[str, int] = {}
        exporter_relay: dict[str, str] = {}
        for item in items:
            key = item["item"]["S"]
            if key.startswith(_RELAY):
                relays[key[len(_RELAY) :]] = int(item["last_seen_ms"]["N"])
            elif key.startswith(_EXPORTER):
                name = key[len(_EXPORTER) :]
                exporters[name] = int(item["last_seen_ms"]["N"])
                exporter_relay[name] = item["relay_id"]["S"]
            elif key == _RATES:
                values.update(
                    record_rate_per_s=float(item["record_rate_per_s"]["N"]),
                    effective_sampling_rate=float(item["effective_sampling_rate"]["N"]),
                    records_total=int(Decimal(item["records_total"]["N"])),
                    rates_micro_batch=int(item["rates_micro_batch"]["N"]),
                    rates_at_ms=int(item["rates_at_ms"]["N"]),
                )
            elif key == _MODEL:
                values.update(
                    model_version=item["model_version"]["S"],
                    model_at_ms=int(item["model_at_ms"]["N"]),
                )
        return TenantState(
            tenant_id=tenant_id,
            relays_last_seen_ms=relays,
            exporters_last_seen_ms=exporters,
            exporter_relay=exporter_relay,
            **values,
        )

    def _update(
        self,
        kind: str,
        tenant_id: str,
        item: str,
        *,
        expression: str,
        condition: str,
        values: dict[str, Any],
    ) -> bool:
        try:
            self.client.update_item(
                TableName=self.table_name,
                Key={"tenant_id": {"S": tenant_id}, "item": {"S": item}},
                UpdateExpression=expression,
                ConditionExpression=condition,
                ExpressionAttributeValues=values,
            )
            return True
        except botocore.exceptions.ClientError as exc:
            code = exc.response["Error"]["Code"]
            if code == "ConditionalCheckFailedException":
                self.stale[kind] += 1
                return False
            raise StateStoreError(
                f"cannot update {kind} state of {tenant_id} ({code}): {exc}"
            ) from exc
