"""The IoT job document that asks a relay to install a model.

The operator (``sampleflow models push``) builds it with
:func:`build_document`; the relay parses it with :func:`parse_document`.
One definition on the edge side, so both ends agree on every key.

Shape (JSON object; AWS caps a job document at 32 KiB)::

    {
      "operation": "sampleflow.install-model",
      "format": 1,
      "model": "relay-ctu13s6-r100-w300",   # manifest "name"
      "version": "1.1.0",                   # manifest "version"
      "sha256": "<hex>",  "size": 4567,     # of the .tflite file
      "manifest": {"sha256": "<hex>", "size": 2345},
      "signature": "<base64 Ed25519 signature of the manifest bytes>",
      "key_id": "<16 hex: first 8 bytes of sha256(raw public key)>",
      "download": {
        "model":    {"url": "..."} | {"s3": {"bucket": "b", "key": "k"}},
        "manifest": {"url": "..."} | {"s3": {"bucket": "b", "key": "k"}}
      }
    }

What is trusted: only the signed manifest.  It names the model file's
``sha256`` and ``bytes``, so the signature covers the model too.  The
document's own ``sha256``/``size`` are an unsigned cross-check (anyone who
may create jobs may edit them) and must agree with the manifest.  A
``url`` is usually an IoT Jobs presigned-URL placeholder
(``${aws:iot:s3-presigned-url:https://s3.amazonaws.com/BUCKET/KEY}``),
which AWS IoT replaces with a fresh presigned S3 GET URL each time the
relay reads the document, so a slow rollout never hands out expired URLs
and the relay needs no AWS credentials.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edge_agent.modelsync.errors import BAD_DOCUMENT, ModelRejectedError

OPERATION = "sampleflow.install-model"
#: How an IoT Jobs presigned-URL placeholder starts.
PRESIGN_PLACEHOLDER = "${aws:iot:s3-presigned-url"
DOCUMENT_FORMAT = 1

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_KEY_ID_RE = re.compile(r"^[0-9a-f]{16}$")
#: Model names and versions end up in directory names on the relay.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass(frozen=True)
class Source:
    """Where to download one file: an HTTP(S) URL, or an S3 bucket and key."""

    url: str | None = None
    bucket: str | None = None
    key: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (see the module doc)."""
        if self.url is not None:
            return {"url": self.url}
        return {"s3": {"bucket": self.bucket, "key": self.key}}

    def describe(self) -> str:
        """A short text for logs (a URL without its query string)."""
        if self.url is not None:
            return self.url.split("?", 1)[0]
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True)
class ModelJobDocument:
    """A parsed model-install job document (see the module doc)."""

    model: str
    version: str
    sha256: str
    size: int
    manifest_sha256: str
    manifest_size: int
    signature: str
    key_id: str
    model_source: Source
    manifest_source: Source

    def to_dict(self) -> dict[str, Any]:
        """The JSON document the operator puts into the job."""
        return {
            "operation": OPERATION,
            "format": DOCUMENT_FORMAT,
            "model": self.model,
            "version": self.version,
            "sha256": self.sha256,
            "size": self.size,
            "manifest": {"sha256": self.manifest_sha256, "size": self.manifest_size},
            "signature": self.signature,
            "key_id": self.key_id,
            "download": {
                "model": self.model_source.to_dict(),
                "manifest": self.manifest_source.to_dict(),
            },
        }


def is_model_document(document: Mapping[str, Any] | None) -> bool:
    """True when a job document asks for a model install (any format)."""
    return bool(document) and (document or {}).get("operation") == OPERATION


def _fail(detail: str) -> ModelRejectedError:
    return ModelRejectedError(BAD_DOCUMENT, detail)


def _text(doc: Mapping[str, Any], key: str, pattern: re.Pattern[str]) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not pattern.match(value):
        raise _fail(f"{key}={value!r} does not match {pattern.pattern}")
    return value


def _size(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _fail(f"{key}={value!r} must be a positive integer (bytes)")
    return value


def _source(value: object, key: str, allow_placeholders: bool) -> Source:
    if not isinstance(value, Mapping):
        raise _fail(f"download.{key} must be an object with 'url' or 's3'")
    if "url" in value:
        url = value["url"]
        if isinstance(url, str) and url.startswith(PRESIGN_PLACEHOLDER):
            if allow_placeholders:
                return Source(url=url)
            raise _fail(
                f"download.{key}.url is a presigned-URL placeholder that AWS IoT did "
                "not replace: the job needs a presignedUrlConfig"
            )
        if not isinstance(url, str) or not url.startswith(("https://", "http://")):
            raise _fail(f"download.{key}.url must be an http(s) URL, got {url!r}")
        return Source(url=url)
    s3 = value.get("s3")
    if isinstance(s3, Mapping):
        bucket, obj_key = s3.get("bucket"), s3.get("key")
        if isinstance(bucket, str) and bucket and isinstance(obj_key, str) and obj_key:
            return Source(bucket=bucket, key=obj_key)
    raise _fail(f"download.{key} needs 'url' or 's3': {{'bucket', 'key'}}")


def parse_document(
    document: Mapping[str, Any] | None, *, allow_placeholders: bool = False
) -> ModelJobDocument:
    """Validate a job document; raises :class:`ModelRejectedError` (bad_document).

    ``allow_placeholders``: accept unreplaced presigned-URL placeholders (the
    operator's check of a document before it creates the job).
    """
    if not isinstance(document, Mapping):
        raise _fail(
            f"job document must be a JSON object, got {type(document).__name__}"
        )
    if document.get("operation") != OPERATION:
        raise _fail(f"operation={document.get('operation')!r}, expected {OPERATION!r}")
    if document.get("format") != DOCUMENT_FORMAT:
        raise _fail(
            f"format={document.get('format')!r}; this relay reads {DOCUMENT_FORMAT}"
        )
    manifest = document.get("manifest")
    download = document.get("download")
    if not isinstance(manifest, Mapping) or not isinstance(download, Mapping):
        raise _fail("'manifest' and 'download' must be objects")
    signature = document.get("signature")
    if not isinstance(signature, str) or not signature:
        raise _fail("signature must be a non-empty base64 string")
    return ModelJobDocument(
        model=_text(document, "model", _NAME_RE),
        version=_text(document, "version", _NAME_RE),
        sha256=_text(document, "sha256", _SHA256_RE),
        size=_size(document.get("size"), "size"),
        manifest_sha256=_text(manifest, "sha256", _SHA256_RE),
        manifest_size=_size(manifest.get("size"), "manifest.size"),
        signature=signature,
        key_id=_text(document, "key_id", _KEY_ID_RE),
        model_source=_source(download.get("model"), "model", allow_placeholders),
        manifest_source=_source(
            download.get("manifest"), "manifest", allow_placeholders
        ),
    )
