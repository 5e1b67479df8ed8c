"""The model-signing key pair (Ed25519) and signing.

The private key stays with the operators (a PKCS#8 PEM file, mode 0600;
unencrypted, so keep it in the secret store you use for other deploy
keys); every relay holds the public key (PEM SubjectPublicKeyInfo) and
checks each manifest's signature against it (``public_keys`` in the
relay's modelsync configuration).
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.modelsync.verify import key_id


def generate_keypair(private_path: Path, public_path: Path) -> str:
    """Write a new key pair; returns its key id.  Never overwrites a file.

    Raises ``FileExistsError`` when either file exists and
    ``FileNotFoundError`` when either folder does not, before writing
    anything (no half-written pair).
    """
    for path in (private_path, public_path):
        if Path(path).exists():
            raise FileExistsError(f"{path} exists; refusing to overwrite a key")
        if not Path(path).absolute().parent.is_dir():
            raise FileNotFoundError(
                f"cannot write {path}: folder {Path(path).absolute().parent} "
                "does not exist"
            )
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_pem)
    Path(public_path).write_bytes(public_pem)
    return key_id(key.public_key())


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read a PEM Ed25519 private key; ``ValueError`` names the file if not one."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), None)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"cannot read private key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def sign(key: Ed25519PrivateKey, data: bytes) -> tuple[str, str]:
    """``(base64 signature, key id)`` of ``data``."""
    return base64.b64encode(key.sign(data)).decode("ascii"), key_id(key.public_key())
