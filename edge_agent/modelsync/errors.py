"""Why a model update was refused: one exception, stable reason codes.

Every check on the way from a job document to a running model raises
:class:`ModelRejectedError` with one of the :data:`REASONS` below.  The
agent reports the job execution FAILED with ``reason`` and ``detail`` in
its ``statusDetails``, counts the reason, and keeps the running model.
"""

from __future__ import annotations

#: Reason codes, stable strings (they appear in job statusDetails).
BAD_DOCUMENT = "bad_document"  # the job document is not a model-install document
UNTRUSTED_KEY = "untrusted_key"  # signed with a key the relay does not hold
DOWNLOAD_FAILED = "download_failed"  # HTTP/S3 error, timeout, connection lost
TOO_LARGE = "too_large"  # larger than the document says or the relay allows
SIZE_MISMATCH = "size_mismatch"  # bytes received != size in document/manifest
SHA256_MISMATCH = "sha256_mismatch"  # digest != the document's / manifest's
BAD_SIGNATURE = "bad_signature"  # Ed25519 check of the manifest failed
BAD_MANIFEST = "bad_manifest"  # not JSON, wrong format, missing/inconsistent keys
SPEC_MISMATCH = "spec_mismatch"  # trained on another feature spec version
INPUT_MISMATCH = "input_mismatch"  # model input shape/dtype differs from manifest
LOAD_FAILED = "load_failed"  # the TFLite interpreter refused the file
NO_CANARY_ROWS = "no_canary_rows"  # too few recent feature rows to test on
NON_FINITE_OUTPUT = "non_finite_output"  # NaN/inf reconstructions or scores
SCORE_OUT_OF_RANGE = "score_out_of_range"  # scores outside [0, 1]
CANARY_ALERT_SHARE = "canary_alert_share"  # flags too many recent (normal) rows
INSTALL_FAILED = "install_failed"  # disk error while installing
INTERRUPTED = "interrupted"  # the relay restarted during this job too often

REASONS: frozenset[str] = frozenset(
    {
        BAD_DOCUMENT,
        UNTRUSTED_KEY,
        DOWNLOAD_FAILED,
        TOO_LARGE,
        SIZE_MISMATCH,
        SHA256_MISMATCH,
        BAD_SIGNATURE,
        BAD_MANIFEST,
        SPEC_MISMATCH,
        INPUT_MISMATCH,
        LOAD_FAILED,
        NO_CANARY_ROWS,
        NON_FINITE_OUTPUT,
        SCORE_OUT_OF_RANGE,
        CANARY_ALERT_SHARE,
        INSTALL_FAILED,
        INTERRUPTED,
    }
)

#: statusDetails values are capped (AWS allows 1,024 characters per value).
MAX_DETAIL_CHARS = 900


class ModelRejectedError(Exception):
    """A model update was refused; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail[:MAX_DETAIL_CHARS] or reason
