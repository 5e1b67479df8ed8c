"""Train the zstd dictionary of batch format version 2 (run once, by hand).

``python -m cloud.bench.wire_dictionary [SIZE]`` prints the dictionary as
the hex block and SHA-256 that edge_agent/wire/dictionary.py pins.  The
dictionary is part of the format: once released it never changes (a new
one is a new major version), so this is provenance, not a build step.

Training bodies: every version 2 body the relay's path (decode, 10 s
windows, 30 s lateness, the default filter, the encoder) makes of

* CTU-13 scenario 6 sampled 1:100 with seed 7 (the size benchmark
  ``bench wire-ctu13`` uses seed 6: other sampled records, same network),
* the shared captures of even index in name order (``bench wire`` measures
  all of them; docs/wire-format.md gives the figures of both halves),

with the tenant, relay and model version replaced by random strings of a
realistic shape, so that the dictionary learns the format's structure and
typical values (ports, protocols, address prefixes, the body keys), not
the benchmark's names or the current model.
"""

from __future__ import annotations

import hashlib
import random
import string
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

import edge_agent.relay.encode as relay_encode
from edge_agent.bench.command import DEFAULT_CAPTURES
from edge_agent.relay.bench import default_filter, measure_capture, measure_datagrams
from edge_agent.wire import HeaderFields, encode_batches

#: Dictionary size in bytes: measured on both benchmarks, 4 KiB took as
#: much off as 16 KiB on the small batches of the shared captures and
#: nothing measurable changes on large ones.
DEFAULT_SIZE = 4096


def _name(rng: random.Random, low: int, high: int) -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(low, high)))


def _bodies_of_run(run: Any, rng: random.Random) -> list[bytes]:
    """Run ``run()`` with the relay's encoder hooked; the v2 bodies of every
    batch it encoded, with names replaced."""
    calls: list[tuple[np.ndarray, np.ndarray | None, HeaderFields]] = []
    original = relay_encode.encode_batches

    def hook(records: np.ndarray, fields: HeaderFields, *args: Any, **kw: Any) -> Any:
        scores = kw.get("scores")
        calls.append((records.copy(), None if scores is None else scores, fields))
        return original(records, fields, *args, **kw)

    relay_encode.encode_batches = hook
    try:
        run()
    finally:
        relay_encode.encode_batches = original
    bodies = []
    for records, scores, fields in calls:
        named = HeaderFields(
            f"{_name(rng, 4, 12)}-{rng.randint(1, 9999):04d}",
            f"{_name(rng, 4, 12)}-{rng.randint(1, 99):02d}",
            fields.window_start_ms,
            fields.window_end_ms,
            None
            if fields.model_version is None
            else f"{_name(rng, 8, 24)}:{rng.randint(1, 9)}.{rng.randint(0, 9)}.0:"
            f"{rng.getrandbits(48):012x}",
        )
        for batch in encode_batches(records, named, iter(range(10**9)).__next__,
                                    "k", scores=scores):  # fmt: skip
            bodies.append(_body(batch.data))
    return bodies


def _body(data: bytes) -> bytes:
    """The msgpack body of a v2 batch (decompressed with the current v2
    dictionary, whatever it is: training only needs the bodies)."""
    from edge_agent.wire.batch import _decompress  # noqa: PLC0415

    return _decompress(b"\x28\xb5\x2f\xfd" + data[4:], 2)


def training_bodies(captures: Path = DEFAULT_CAPTURES) -> Iterator[bytes]:
    """The bodies described in the module docstring."""
    from cloud.bench.wire_ctu13 import ctu13_datagrams  # noqa: PLC0415
    from cloud.training import ctu13  # noqa: PLC0415

    rng = random.Random(2)
    replay = ctu13_datagrams(100, 7, None)
    yield from _bodies_of_run(
        lambda: measure_datagrams(
            "ctu13-seed7",
            replay.datagrams,
            10_000,
            30_000,
            default_filter(ctu13.INTERNAL_NETWORKS),
        ),
        rng,
    )
    for path in sorted(captures.glob("*.pcap"))[::2]:
        yield from _bodies_of_run(
            lambda p=path: measure_capture(p, relay_filter=default_filter()), rng
        )


def train(size: int = DEFAULT_SIZE) -> bytes:
    """The trained dictionary (zstd's cover trainer, level 3 tables)."""
    samples: list[bytes | bytearray | memoryview[int]] = list(training_bodies())
    trained = zstandard.train_dictionary(size, samples, level=3, steps=8, threads=1)
    return trained.as_bytes()


def main(argv: list[str]) -> int:
    """Print the dictionary's hex (64 characters a line) and SHA-256."""
    data = train(int(argv[0]) if argv else DEFAULT_SIZE)
    text = data.hex()
    for i in range(0, len(text), 64):
        print(f'    "{text[i : i + 64]}"')
    print(f"# {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
