"""The relay's model folder: immutable versions, two pointers, one state file.

Layout of ``models_dir``::

    versions/<model>-<version>-<sha12>/<model_file>    (the manifest's name)
                                      /manifest.json
                                      /manifest.sig      (base64, as in the job)
    current      one line: the versions/ entry that runs
    previous     one line: the entry that ran before (kept for rollback)
    state.json   the update in progress, if any (see :class:`UpdateState`)
    tmp/         downloads in progress; emptied at start-up

Every write that matters is atomic: write a temporary file in the same
folder, fsync it, ``os.replace`` it over the target, fsync the folder.  A
version folder is renamed into ``versions/`` only once it is complete and
verified, and ``current`` is only ever pointed at such a folder, so a
power cut at any moment leaves ``current`` naming a complete model (or
nothing on a relay that never had one).  :meth:`ModelStore.recover` checks
that at start-up and falls back to ``previous`` if ``current`` is damaged.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog

from edge_agent.modelsync.verify import file_digest

log = structlog.get_logger(__name__)

MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
_ENTRY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,250}$")

#: Update phases recorded in ``state.json``, in order.
DOWNLOADING = "downloading"  # files go to tmp/; ``current`` is untouched
INSTALLING = "installing"  # the verified version is in versions/; pointer next
INSTALLED = "installed"  # ``current`` names the new version and it runs
FAILED = "failed"  # refused; ``current`` is untouched
PHASES = (DOWNLOADING, INSTALLING, INSTALLED, FAILED)


@dataclass
class UpdateState:
    """The update in progress: what the relay must finish or report."""

    job_id: str
    execution_number: int
    phase: str
    #: versions/ entry being installed ("" until known)
    target: str = ""
    #: the entry that ran when the job started ("" on a first install)
    previous: str = ""
    #: how many times this job was started (restarts included)
    attempts: int = 1
    reason: str = ""
    detail: str = ""
    details: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class InstalledModel:
    """A complete version folder."""

    entry: str
    path: Path
    manifest: dict[str, Any]

    @property
    def model_path(self) -> Path:
        return self.path / str(self.manifest["model_file"])

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_FILE

    @property
    def version(self) -> str:
        return str(self.manifest.get("version", "?"))

    @property
    def name(self) -> str:
        return str(self.manifest.get("name", "?"))


def entry_name(model: str, version: str, sha256: str) -> str:
    """The versions/ folder name of one model file."""
    return f"{model}-{version}-{sha256[:12]}"


def fsync_dir(path: Path) -> None:
    """fsync a folder so a rename inside it survives a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class ModelStore:
    """The model folder of one relay (see the module doc)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.versions = self.root / "versions"
        self.tmp = self.root / "tmp"
        self.state_path = self.root / "state.json"
        self.versions.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    # -- state file ------------------------------------------------------
    def read_state(self) -> UpdateState | None:
        """The recorded update, or None; a damaged file is logged and dropped."""
        try:
            data = json.loads(self.state_path.read_bytes())
            state = UpdateState(**data)
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            log.warning(
                "modelsync_state_unreadable", path=str(self.state_path), error=str(exc)
            )
            return None
        if state.phase not in PHASES:
            log.warning("modelsync_state_unreadable", phase=state.phase)
            return None
        return state

    def write_state(self, state: UpdateState) -> None:
        """Record the update's phase durably (atomic replace)."""
        write_atomic(self.state_path, json.dumps(asdict(state)).encode())

    def clear_state(self) -> None:
        """Forget the finished update."""
        with contextlib.suppress(FileNotFoundError):
            self.state_path.unlink()
            fsync_dir(self.root)

    # -- pointers ----------------------------------------------------------
    def _pointer(self, name: str) -> str:
        try:
            entry = (self.root / name).read_text().strip()
        except FileNotFoundError:
            return ""
        return entry if _ENTRY_RE.match(entry) else ""

    def current_entry(self) -> str:
        """The versions/ entry ``current`` names ("" if none)."""
        return self._pointer("current")

    def previous_entry(self) -> str:
        """The versions/ entry ``previous`` names ("" if none)."""
        return self._pointer("previous")

    def load(self, entry: str) -> InstalledModel | None:
        """A complete, intact version folder, or None.

        Intact: the manifest parses and the model file's size and SHA-256
        are the manifest's.
        """
        if not entry or not _ENTRY_RE.match(entry):
            return None
        path = self.versions / entry
        try:
            manifest = json.loads((path / MANIFEST_FILE).read_bytes())
            model_file = manifest["model_file"]
            if not isinstance(model_file, str) or not _ENTRY_RE.match(model_file):
                return None
            size, sha = file_digest(path / model_file)
        except (OSError, ValueError, TypeError, KeyError):
            return None
        if manifest.get("bytes") != size or manifest.get("sha256") != sha:
            return None
        return InstalledModel(entry=entry, path=path, manifest=manifest)

    def current(self) -> InstalledModel | None:
        """The model that runs, or None on a relay that never had one."""
        return self.load(self.current_entry())

    def set_current(self, entry: str) -> None:
        """Point ``current`` at ``entry``; the old current becomes ``previous``.

        ``previous`` is written first: a crash in between leaves ``current``
        unchanged and ``previous`` naming it, which is harmless.
        """
        old = self.current_entry()
        if old and old != entry:
            write_atomic(self.root / "previous", f"{old}\n".encode())
        write_atomic(self.root / "current", f"{entry}\n".encode())

    def point_back(self, entry: str, previous: str) -> None:
        """Set both pointers (a rollback to ``entry``)."""
        if previous:
            write_atomic(self.root / "previous", f"{previous}\n".encode())
        write_atomic(self.root / "current", f"{entry}\n".encode())

    # -- versions ---------------------------------------------------------
    def new_tmp(self) -> Path:
        """A fresh empty folder under tmp/ for one download."""
        path = self.tmp / uuid.uuid4().hex
        path.mkdir()
        return path

    def commit(self, staged: Path, entry: str) -> InstalledModel:
        """Move a complete, verified staged folder into versions/ as ``entry``.

        If that entry already exists intact (a rollback to a kept version,
        or a restart after this rename), the staged copy is dropped.
        """
        for path in staged.iterdir():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(staged)
        existing = self.load(entry)
        if existing is not None:
            shutil.rmtree(staged, ignore_errors=True)
            return existing
        target = self.versions / entry
        if target.exists():  # a damaged leftover: replace it
            shutil.rmtree(target)
        os.replace(staged, target)
        fsync_dir(self.versions)
        installed = self.load(entry)
        if installed is None:
            raise OSError(f"version {entry} is not intact after the rename")
        return installed

    def prune(self, keep: set[str]) -> list[str]:
        """Delete version folders other than ``current``, ``previous`` and ``keep``."""
        wanted = {self.current_entry(), self.previous_entry(), *keep}
        removed = []
        for path in sorted(self.versions.iterdir()):
            if path.name not in wanted:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
        return removed

    def recover(self) -> InstalledModel | None:
        """Start-up: empty tmp/ and make sure ``current`` names an intact model.

        A damaged or missing current falls back to ``previous``, then to the
        newest intact version folder.  Returns the model that will run.
        """
        for path in self.tmp.iterdir():
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()
        current = self.current()
        if current is not None:
            return current
        bad = self.current_entry()
        newest_first = sorted(
            (p.name for p in self.versions.iterdir()),
            key=lambda n: (self.versions / n).stat().st_mtime,
            reverse=True,
        )
        candidates = [self.previous_entry(), *newest_first]
        for entry in candidates:
            model = self.load(entry)
            if model is not None:
                log.warning("modelsync_current_repaired", bad=bad, now=entry)
                write_atomic(self.root / "current", f"{entry}\n".encode())
                return model
        return None
