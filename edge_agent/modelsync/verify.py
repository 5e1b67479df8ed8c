"""Checks on downloaded model files: size, SHA-256, Ed25519 signature, manifest.

The relay trusts a model only through its manifest's Ed25519 signature,
made by the operator's private key (``sampleflow models keygen``) and
checked against the public keys in the relay's configuration.  The
manifest names the model file's SHA-256 and size, so a verified manifest
pins the model bytes as well.  Keys are PEM SubjectPublicKeyInfo files;
their id is the first 8 bytes (16 hex digits) of SHA-256 over the raw
32-byte public key, so several keys can be trusted at once (rotation).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_agent.features.spec import FEATURE_NAMES
from edge_agent.modelsync.document import ModelJobDocument
from edge_agent.modelsync.errors import (
    BAD_MANIFEST,
    BAD_SIGNATURE,
    SHA256_MISMATCH,
    SIZE_MISMATCH,
    UNTRUSTED_KEY,
    ModelRejectedError,
)

#: The manifest format the training code writes (cloud/training/train.py).
MANIFEST_FORMAT = "sampleflow-model/1"
_READ_CHUNK = 1 << 20
#: A model file name: no folders, no leading dot.
_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")


def key_id(public_key: Ed25519PublicKey) -> str:
    """16 hex digits identifying a public key (see the module doc)."""
    raw = public_key.public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read a PEM Ed25519 public key; ``ValueError`` names the file if not one."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read public key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key


def trusted_keys(paths: Iterable[Path]) -> dict[str, Ed25519PublicKey]:
    """Load public keys and index them by :func:`key_id`."""
    keys = {}
    for path in paths:
        key = load_public_key(path)
        keys[key_id(key)] = key
    if not keys:
        raise ValueError("at least one trusted public key is needed")
    return keys


def check_tls_files(cert_path: Path, key_path: Path, ca_path: Path) -> None:
    """Check the relay's mutual-TLS material before the MQTT client sees it
    (it fails deep inside awscrt with no file name): the certificate and
    the CA file must hold PEM certificates, the key a PEM private key.
    Raises ``ValueError`` naming the setting and the file."""
    checks = (
        ("modelsync.cert_path", cert_path, "a PEM certificate"),
        ("modelsync.key_path", key_path, "a PEM private key"),
        ("modelsync.ca_path", ca_path, "PEM CA certificates"),
    )
    for key, path, what in checks:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ValueError(
                f"{key}={str(path)!r}: cannot read it ({exc.strerror or exc})"
            ) from None
        try:
            if key == "modelsync.key_path":
                serialization.load_pem_private_key(data, password=None)
            elif key == "modelsync.cert_path":
                x509.load_pem_x509_certificate(data)
            elif not x509.load_pem_x509_certificates(data):
                raise ValueError("no certificate in it")
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{key}={str(path)!r}: not {what} ({exc})") from None


def verify_signature(
    manifest_bytes: bytes,
    signature_b64: str,
    signer_id: str,
    keys: Mapping[str, Ed25519PublicKey],
) -> None:
    """Check the manifest's signature; raises :class:`ModelRejectedError`."""
    key = keys.get(signer_id)
    if key is None:
        raise ModelRejectedError(
            UNTRUSTED_KEY,
            f"signed by key {signer_id}; this relay trusts {sorted(keys)}",
        )
    try:
        signature = base64.b64decode(signature_b64, validate=True)
        key.verify(signature, manifest_bytes)
    except (InvalidSignature, binascii.Error, ValueError) as exc:
        raise ModelRejectedError(
            BAD_SIGNATURE, f"manifest signature does not verify with key {signer_id}"
        ) from exc


def file_digest(path: Path) -> tuple[int, str]:
    """``(size in bytes, sha256 hex)`` of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    size = 0
    with Path(path).open("rb") as fh:
        while chunk := fh.read(_READ_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def check_digest(
    what: str, size: int, sha256: str, want_size: int, want_sha256: str
) -> None:
    """Raise size_mismatch / sha256_mismatch unless both match."""
    if size != want_size:
        raise ModelRejectedError(
            SIZE_MISMATCH, f"{what} is {size} bytes, expected {want_size}"
        )
    if sha256 != want_sha256:
        raise ModelRejectedError(
            SHA256_MISMATCH, f"{what} sha256 {sha256}, expected {want_sha256}"
        )


def parse_manifest(manifest_bytes: bytes, doc: ModelJobDocument) -> dict[str, Any]:
    """Decode a (signature-checked) manifest and cross-check it with the job.

    Checks the format, that the name, version, model size and SHA-256 agree
    with the job document, and that the feature names are known.  It does
    not check the feature spec version: that is the installer's canary
    (reason ``spec_mismatch``).
    """
    try:
        manifest = json.loads(manifest_bytes)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelRejectedError(BAD_MANIFEST, f"manifest is not JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ModelRejectedError(BAD_MANIFEST, "manifest is not a JSON object")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ModelRejectedError(
            BAD_MANIFEST,
            f"manifest format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}",
        )
    for key, want in (
        ("name", doc.model),
        ("version", doc.version),
        ("sha256", doc.sha256),
        ("bytes", doc.size),
    ):
        if manifest.get(key) != want:
            raise ModelRejectedError(
                BAD_MANIFEST,
                f"manifest {key}={manifest.get(key)!r} but the job says {want!r}",
            )
    features = manifest.get("features")
    if (
        not isinstance(features, list)
        or not features
        or not all(isinstance(f, str) and f in FEATURE_NAMES for f in features)
    ):
        raise ModelRejectedError(
            BAD_MANIFEST, f"manifest features {features!r} are not known features"
        )
    model_file = manifest.get("model_file")
    if (
        not isinstance(model_file, str)
        or not _FILE_RE.match(model_file)
        or model_file == "manifest.json"
    ):
        raise ModelRejectedError(
            BAD_MANIFEST, f"manifest model_file={model_file!r} is not a plain file name"
        )
    if not isinstance(manifest.get("feature_spec_version"), int):
        raise ModelRejectedError(BAD_MANIFEST, "manifest has no feature_spec_version")
    return manifest
