"""Find, load and reload the service's models; map tenants to them.

Layout, the same in a folder and under an S3 prefix::

    <root>/<name>.manifest.json           shared models (the default, and
    <root>/<name>.tflite                  models tenants are mapped to)
    <root>/tenants/<tenant>/<name>.manifest.json   a tenant's own model
    <root>/tenants/<tenant>/<name>.tflite

Manifests are ``sampleflow-model/1`` (docs/models.md); only ``kind:
cloud`` ones are loaded (the relay's models next to them are skipped).
A model is loaded with :func:`edge_agent.filter.model.load_model`, which
checks the file's sha256, the feature spec version and the interpreter's
input signature.

A tenant is scored by, in this order: its own model, the shared model the
configuration maps it to, the default shared model.  With no default
configured, a tenant with neither is unknown.

:meth:`ModelRegistry.refresh` polls the source: a manifest whose
signature changed (folder: mtime and size of the manifest and of the files
sharing its name stem; S3: their ETags) is loaded again, and the new set
of models replaces the old one in one reference assignment, so a request
sees either the old or the new set, never a mix.  A model that fails to
load keeps the previous version in service, is counted by reason, and is
tried again when its signature changes.  To publish a model, write the
model file first and the manifest last (on S3: PUT the manifest last; in a
folder: rename the manifest into place).
"""

from __future__ import annotations

import collections
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog

from edge_agent.filter.model import LoadedModel, ModelLoadError, load_model

log = structlog.get_logger(__name__)

MANIFEST_SUFFIX = ".manifest.json"
TENANTS_DIR = "tenants"
MODEL_KIND = "cloud"

#: What identifies a manifest's current content (stat or ETag values).
Signature = tuple[str, ...]


class UnknownTenantError(LookupError):
    """Raised when a tenant has no model of its own, no mapping and there is
    no default model."""


class ModelNotLoadedError(LookupError):
    """Raised when the model a tenant maps to is not loaded (yet)."""


class ModelSource(Protocol):
    """Where manifests and model files come from."""

    def describe(self) -> str:
        """Where the models are (for logs and /version)."""
        ...

    def list_manifests(self) -> dict[str, Signature]:
        """Every manifest key (path relative to the root) and its signature."""
        ...

    def fetch(self, key: str) -> Path:
        """A local manifest path for ``key`` with its model file beside it."""
        ...

    def release(self, key: str, path: Path) -> None:
        """``path`` (from :meth:`fetch`) is no longer needed."""
        ...


def _is_manifest_key(key: str) -> bool:
    parts = key.split("/")
    if not parts[-1].endswith(MANIFEST_SUFFIX):
        return False
    return len(parts) == 1 or (len(parts) == 3 and parts[0] == TENANTS_DIR)


def _stem(key: str) -> str:
    return key[: -len(MANIFEST_SUFFIX)]


class DirectorySource:
    """Models in a local folder, loaded in place."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def describe(self) -> str:
        return str(self.root)

    def list_manifests(self) -> dict[str, Signature]:
        found: dict[str, Signature] = {}
        paths = [
            *self.root.glob(f"*{MANIFEST_SUFFIX}"),
            *self.root.glob(f"{TENANTS_DIR}/*/*{MANIFEST_SUFFIX}"),
        ]
        for path in sorted(paths):
            key = path.relative_to(self.root).as_posix()
            stem = path.name[: -len(MANIFEST_SUFFIX)]
            sig: list[str] = []
            for sibling in sorted(path.parent.glob(f"{stem}.*")):
                try:
                    st = sibling.stat()
                except OSError:
                    continue  # removed while listing
                sig.append(f"{sibling.name}:{st.st_mtime_ns}:{st.st_size}")
            found[key] = tuple(sig)
        return found

    def fetch(self, key: str) -> Path:
        return self.root / key

    def release(self, key: str, path: Path) -> None:
        pass  # loaded in place


class S3Source:
    """Models under an S3 prefix, downloaded to a local cache to load.

    ``client`` is a boto3 S3 client (``endpoint_url`` for a local server).
    Each fetch goes to a fresh folder under ``cache_dir``, removed by
    :meth:`release` once the model has been loaded into memory.
    """

    def __init__(
        self, client: Any, bucket: str, prefix: str = "", cache_dir: Path | None = None
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.cache_dir = Path(cache_dir or tempfile.mkdtemp(prefix="sf-models-"))

    @classmethod
    def from_uri(cls, uri: str, client: Any, cache_dir: Path | None = None) -> S3Source:
        """From ``s3://bucket/prefix``; raises ``ValueError`` on another form."""
        if not uri.startswith("s3://") or len(uri) <= len("s3://"):
            raise ValueError(
                f"models URI must look like s3://bucket/prefix, got {uri!r}"
            )
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        return cls(client, bucket, prefix, cache_dir)

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def list_manifests(self) -> dict[str, Signature]:
        etags: dict[str, str] = {}
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
            for obj in page.get("Contents", []):
                etags[obj["Key"][len(self.prefix) :]] = str(obj["ETag"])
        found: dict[str, Signature] = {}
        for key in sorted(etags):
            if not _is_manifest_key(key):
                continue
            stem = _stem(key)
            found[key] = tuple(
                f"{k.rsplit('/', 1)[-1]}:{etags[k]}"
                for k in sorted(etags)
                if k.startswith(stem + ".")
            )
        return found

    def fetch(self, key: str) -> Path:
        folder = Path(tempfile.mkdtemp(prefix="m-", dir=self.cache_dir))
        manifest_path = folder / key.rsplit("/", 1)[-1]
        self._download(key, manifest_path)
        try:
            model_file = str(json.loads(manifest_path.read_text())["model_file"])
        except (ValueError, KeyError, TypeError):
            return manifest_path  # load_model reports the bad manifest
        if "/" in model_file or model_file in {"", ".", ".."}:
            return manifest_path  # load_model will not find it: "missing"
        base = key.rsplit("/", 1)[0] + "/" if "/" in key else ""
        self._download(base + model_file, folder / model_file)
        return manifest_path

    def release(self, key: str, path: Path) -> None:
        shutil.rmtree(path.parent, ignore_errors=True)

    def _download(self, key: str, dest: Path) -> None:
        try:
            self.client.download_file(self.bucket, self.prefix + key, str(dest))
        except Exception as exc:  # botocore raises several unrelated types
            log.warning("model_download_failed", key=key, error=str(exc))


@dataclass(frozen=True)
class ModelSet:
    """An immutable set of loaded models (what one request sees)."""

    shared: Mapping[str, LoadedModel] = field(default_factory=dict)
    tenants: Mapping[str, LoadedModel] = field(default_factory=dict)
    loaded_at: float = 0.0

    def __len__(self) -> int:
        return len(self.shared) + len(self.tenants)


@dataclass(frozen=True)
class RefreshReport:
    """What one poll did: keys loaded, failed (key -> reason), removed."""

    loaded: tuple[str, ...] = ()
    failed: Mapping[str, str] = field(default_factory=dict)
    removed: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()


def _version_key(model: LoadedModel) -> tuple[tuple[int, ...], str]:
    text = str(model.manifest.get("version", ""))
    try:
        numbers = tuple(int(p) for p in text.split("."))
    except ValueError:
        numbers = ()
    return numbers, text


class ModelRegistry:
    """The loaded models and the tenant mapping (see the module doc).

    ``default_model``: name of the shared model for tenants without their
    own (``None``: such tenants are unknown).  ``tenant_models``: tenant ->
    shared model name.  Inert until :meth:`refresh` or :meth:`start`.
    """

    def __init__(
        self,
        source: ModelSource,
        default_model: str | None,
        tenant_models: Mapping[str, str] | None = None,
        poll_interval_s: float = 10.0,
    ) -> None:
        if poll_interval_s <= 0:
            raise ValueError(
                f"poll_interval_s must be > 0 seconds, got {poll_interval_s}"
            )
        self.source = source
        self.default_model = default_model
        self.tenant_models = dict(tenant_models or {})
        self.poll_interval_s = poll_interval_s
        self._models = ModelSet()
        # key -> (signature, model); signature of a failed load with no model.
        self._entries: dict[str, tuple[Signature, LoadedModel | None]] = {}
        self._lock = threading.Lock()  # one refresh at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Loads by outcome: ``ok`` or a ModelLoadError reason, ``skipped``.
        self.loads: collections.Counter[str] = collections.Counter()
        self.poll_errors = 0

    @property
    def models(self) -> ModelSet:
        """The current model set (replaced whole on reload)."""
        return self._models

    def missing(self) -> list[str]:
        """Configured shared models that are not loaded (for readiness)."""
        wanted = set(self.tenant_models.values())
        if self.default_model is not None:
            wanted.add(self.default_model)
        return sorted(wanted - set(self._models.shared))

    def ready(self) -> bool:
        """At least one model, and every configured shared model, loaded."""
        return len(self._models) > 0 and not self.missing()

    def resolve(self, tenant: str) -> LoadedModel:
        """The model that scores ``tenant`` (see the module doc)."""
        models = self._models
        own = models.tenants.get(tenant)
        if own is not None:
            return own
        name = self.tenant_models.get(tenant, self.default_model)
        if name is None:
            raise UnknownTenantError(
                f"tenant {tenant!r} has no model of its own and there is no "
                "default model: add tenants/<tenant>/ to the models, map the "
                "tenant to a shared model, or configure a default"
            )
        model = models.shared.get(name)
        if model is None:
            raise ModelNotLoadedError(
                f"model {name!r} for tenant {tenant!r} is not loaded; loaded "
                f"shared models: {', '.join(sorted(models.shared)) or 'none'}"
            )
        return model

    def refresh(self) -> RefreshReport:
        """Poll the source once; load what changed; swap the set atomically."""
        with self._lock:
            return self._refresh()

    def _refresh(self) -> RefreshReport:
        listed = self.source.list_manifests()
        loaded: list[str] = []
        failed: dict[str, str] = {}
        skipped: list[str] = []
        entries = {k: v for k, v in self._entries.items() if k in listed}
        removed = tuple(sorted(set(self._entries) - set(listed)))
        for key, signature in listed.items():
            previous = entries.get(key)
            if previous is not None and previous[0] == signature:
                continue
            path = self.source.fetch(key)
            try:
                model = load_model(path)
                if model.manifest.get("kind") != MODEL_KIND:
                    skipped.append(key)
                    self.loads["skipped"] += 1
                    entries[key] = (signature, None)
                    continue
            except ModelLoadError as exc:
                failed[key] = exc.reason
                self.loads[exc.reason] += 1
                log.warning(
                    "model_load_failed", key=key, reason=exc.reason, error=str(exc)
                )
                # Keep serving the previous version; retry on the next change.
                entries[key] = (signature, previous[1] if previous else None)
                continue
            finally:
                self.source.release(key, path)
            self.loads["ok"] += 1
            entries[key] = (signature, model)
            loaded.append(key)
            log.info("model_loaded", key=key, version=model.version)
        if loaded or removed or failed or skipped:
            self._entries = entries
            self._models = self._build(entries)
        return RefreshReport(tuple(loaded), failed, removed, tuple(skipped))

    def _build(
        self, entries: Mapping[str, tuple[Signature, LoadedModel | None]]
    ) -> ModelSet:
        shared: dict[str, LoadedModel] = {}
        tenants: dict[str, LoadedModel] = {}
        for key, (_, model) in sorted(entries.items()):
            if model is None:
                continue
            parts = key.split("/")
            if len(parts) == 1:
                if model.name in shared:
                    log.warning("model_name_twice", name=model.name, key=key)
                shared[model.name] = model
                continue
            tenant = parts[1]
            current = tenants.get(tenant)
            if current is None or _version_key(model) > _version_key(current):
                if current is not None:
                    log.warning(
                        "tenant_models_several", tenant=tenant, using=model.version
                    )
                tenants[tenant] = model
        return ModelSet(shared=shared, tenants=tenants, loaded_at=time.time())

    def start(self) -> None:
        """Refresh now, then every ``poll_interval_s`` in a daemon thread."""
        self._poll_once()
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name="model-poll", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop the poll thread (waits for a refresh in progress)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            self._poll_once()

    def _poll_once(self) -> None:
        try:
            self.refresh()
        except Exception as exc:  # a listing failure must not stop polling
            self.poll_errors += 1
            log.warning(
                "model_poll_failed", source=self.source.describe(), error=str(exc)
            )
