"""The zstd dictionaries of batch format versions 1 and 2 (fixed forever).

A batch of a quiet exporter holds a handful of rows, and most of its bytes
are then the same in every batch: the header keys, the twenty column
descriptors, the usual encodings.  zstd can only find such repeats within
one frame, so every frame is compressed with this "raw content" dictionary
(zstd's name for a dictionary that is plain history): two template bodies
of one and two rows.  It takes about 20% off the shipped bytes of the
shared captures (see docs/wire-format.md) and nothing measurable off large
batches.

These bytes ARE the format: a reader decompresses with exactly them.  They
were produced once from template rows and are written out here instead of
being generated, so no later change to the encoder can alter them; a test
pins their SHA-256.  A different dictionary means a new major version.

Version 2 uses a dictionary trained on version 2 bodies (16 KiB, content
and entropy tables), shipped as the file ``dictionary_v2.zdict`` and
checked against its pinned SHA-256 when this module is imported.
"""

from __future__ import annotations

import hashlib
from importlib.resources import files

import zstandard

#: SHA-256 of :data:`DICTIONARY_V1`, as given in docs/wire-format.md.
DICTIONARY_V1_SHA256 = (
    "6ac910be057508b1a0d22d37b8463f9e0f3387735c3a112e55790326b3163421"
)

#: 545 bytes: two template msgpack bodies (1 and 2 rows).
DICTIONARY_V1 = bytes.fromhex(
    "8ba17600a174a0a172a0a169c41000000000000000000000000000000000a173"
    "00a177cf0000018bcfe56800a16ccd2710a16e01a165cd7918a170920002a163"
    "dc0014930301c41000000000000000000000ffffc0000201930401c410000000"
    "00000000000000ffff0a000001930501c41000000000000000000000ffffc0a8"
    "0101930601c404e8030000930701c40401000000930801c40402000000930901"
    "c404ff1f0000930a01c402bb01930b01c40250c3930c01c40106930d01c40100"
    "930e01c40109930f01c40104931001c401ff930101c4080068e5cf8b01000093"
    "0201c4080068e5cf8b010000931101c408dc05000000000000931201c4080100"
    "000000000000931301c40401000000931401c4021b008ba17600a174a0a172a0"
    "a169c41000000000000000000000000000000000a17300a177cf0000018bcfe5"
    "6800a16ccd2710a16e02a165cd7918a170920002a163dc0014930301c4100000"
    "0000000000000000ffffc0000201930403c4080a0000010a000002930503c408"
    "c0a80101c0a80102930601c404e8030000950702c40200010101930801c40402"
    "000000930901c404ff1f0000950a02c402000101cd01bb950b02c402000701cd"
    "c350930c01c40106930d01c40100930e01c40109930f01c40104931001c401ff"
    "950102c40400d2000402cf0000018bcfe56800960204c4020064010001951102"
    "c402004d01cd05dc951202c40200010101931301c40401000000931401c4021b"
    "00"
)


def zstd_dictionary() -> zstandard.ZstdCompressionDict:
    """The v1 dictionary as a zstandard raw-content dictionary."""
    return zstandard.ZstdCompressionDict(
        DICTIONARY_V1, dict_type=zstandard.DICT_TYPE_RAWCONTENT
    )


#: SHA-256 of :data:`DICTIONARY_V2`, as given in docs/wire-format.md.
DICTIONARY_V2_SHA256 = (
    "846e6df718506025c08cd333eb4599146f502fcb451f8a9b81591f62a4dc410e"
)


def _load_v2() -> bytes:
    data = (files("edge_agent.wire") / "dictionary_v2.zdict").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != DICTIONARY_V2_SHA256:
        raise RuntimeError(
            f"edge_agent/wire/dictionary_v2.zdict has SHA-256 {digest}, not the "
            f"{DICTIONARY_V2_SHA256} of format version 2: the package is damaged"
        )
    return data


#: 16,384 bytes: a zstd dictionary (content and entropy tables) trained
#: by zstd's cover trainer on version 2 bodies; see cloud/bench/
#: wire_dictionary.py for the training data and docs/wire-format.md for
#: what it takes off.  Read from dictionary_v2.zdict beside this module.
DICTIONARY_V2 = _load_v2()


def zstd_dictionary_v2() -> zstandard.ZstdCompressionDict:
    """The v2 dictionary as a zstandard (trained, full) dictionary."""
    return zstandard.ZstdCompressionDict(
        DICTIONARY_V2, dict_type=zstandard.DICT_TYPE_FULLDICT
    )
