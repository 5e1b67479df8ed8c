"""Downloading a model file to a temporary path, bounded and hashed on the fly.

HTTP(S) URLs (the usual case: a presigned S3 GET URL that AWS IoT Jobs put
into the document) are fetched with ``urllib``; ``s3`` sources with boto3
and the relay's own credentials (boto3's normal chain).  The body is
streamed to ``dest`` in chunks while its SHA-256 is computed, and reading
stops as soon as it passes ``max_bytes``, so a wrong or hostile size
cannot fill the relay's disk.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import botocore.exceptions

from edge_agent.modelsync.document import Source
from edge_agent.modelsync.errors import DOWNLOAD_FAILED, TOO_LARGE, ModelRejectedError

#: Called after each chunk written, with the bytes written so far (tests use
#: it to stop a relay mid-download).
ProgressHook = Callable[[int], None]


@dataclass(frozen=True)
class Downloaded:
    """What :func:`download` wrote: ``size`` bytes with this ``sha256``."""

    path: Path
    size: int
    sha256: str


def download(
    source: Source,
    dest: Path,
    *,
    max_bytes: int,
    timeout_s: float,
    chunk_bytes: int = 64 * 1024,
    s3_client: Callable[[], Any] | None = None,
    on_chunk: ProgressHook | None = None,
) -> Downloaded:
    """Fetch ``source`` into ``dest`` (created or truncated, fsynced).

    Raises :class:`ModelRejectedError` ``download_failed`` for network,
    HTTP and S3 errors and ``too_large`` past ``max_bytes``.  ``dest`` may
    hold a partial file after an error; callers download into a temporary
    folder they remove.
    """
    try:
        if source.url is not None:
            request = urllib.request.Request(source.url, method="GET")
            with urllib.request.urlopen(request, timeout=timeout_s) as resp:
                return _stream(resp, dest, max_bytes, chunk_bytes, on_chunk)
        if s3_client is None:
            raise ModelRejectedError(
                DOWNLOAD_FAILED, "an s3 source needs an S3 client on this relay"
            )
        obj = s3_client().get_object(Bucket=source.bucket, Key=source.key)
        body = obj["Body"]
        try:
            return _stream(body, dest, max_bytes, chunk_bytes, on_chunk)
        finally:
            body.close()
    except ModelRejectedError:
        raise
    except urllib.error.HTTPError as exc:
        raise ModelRejectedError(
            DOWNLOAD_FAILED, f"GET {source.describe()}: HTTP {exc.code} {exc.reason}"
        ) from exc
    except (OSError, botocore.exceptions.BotoCoreError) as exc:
        raise ModelRejectedError(
            DOWNLOAD_FAILED, f"GET {source.describe()}: {exc}"
        ) from exc
    except botocore.exceptions.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "?")
        raise ModelRejectedError(
            DOWNLOAD_FAILED, f"GET {source.describe()}: S3 {code}"
        ) from exc


def _stream(
    body: Any,
    dest: Path,
    max_bytes: int,
    chunk_bytes: int,
    on_chunk: ProgressHook | None,
) -> Downloaded:
    digest = hashlib.sha256()
    size = 0
    with Path(dest).open("wb") as fh:
        while True:
            chunk = body.read(chunk_bytes)
            if not chunk:
                break
            size += len(chunk)
            if size > max_bytes:
                raise ModelRejectedError(
                    TOO_LARGE, f"download passed the limit of {max_bytes} bytes"
                )
            digest.update(chunk)
            fh.write(chunk)
            if on_chunk is not None:
                fh.flush()
                on_chunk(size)
        fh.flush()
        os.fsync(fh.fileno())
    return Downloaded(path=Path(dest), size=size, sha256=digest.hexdigest())
