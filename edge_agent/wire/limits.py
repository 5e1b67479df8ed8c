"""Amazon Kinesis Data Streams limits that shape a batch, in bytes.

From the PutRecord/PutRecords API reference: a record's data blob plus its
partition key may not exceed 1 MiB; a partition key is 1 to 256 Unicode
characters; one PutRecords call takes at most 500 records and 5 MiB
including partition keys.  The encoder keeps every batch under the record
limit; the request limits are the shipper's to respect.
"""

from __future__ import annotations

#: Largest data + partition key (UTF-8 bytes) of one Kinesis record.
KINESIS_MAX_RECORD_BYTES = 1024 * 1024
#: Longest partition key, in Unicode characters.
KINESIS_MAX_PARTITION_KEY_CHARS = 256
#: Most records in one PutRecords request.
KINESIS_MAX_RECORDS_PER_PUT = 500
#: Most bytes (data + partition keys) in one PutRecords request.
KINESIS_MAX_BYTES_PER_PUT = 5 * 1024 * 1024
#: Bytes a shard accepts per second (records per second: 1000).
KINESIS_SHARD_BYTES_PER_SECOND = 1024 * 1024
