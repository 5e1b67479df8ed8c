"""The Debian package and the container image of the relay (packaging/).

The package is built for real once per run (packaging/deb/build.py: a
fresh venv, the project's wheel and its base dependencies from the
package registries; gzip instead of xz, which only changes the
compressor), then read with dpkg-deb and extracted to a temporary
folder.  The extracted venv is run with its own interpreter
(``<tmp>/opt/sampleflow-relay/bin/python``): a venv finds its prefix from
where that interpreter is, so it works away from /opt, while the scripts'
``#!/opt/sampleflow-relay/bin/python`` lines only work once installed
(their text is checked instead).

No Docker engine runs here: the Dockerfile is read with Docker's own
parser (the ``dockerfile`` package) and checked against the tree.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.relay import config as relay_config

ROOT = Path(__file__).resolve().parents[1]
PACKAGING = ROOT / "packaging"
PREFIX = "/opt/sampleflow-relay"
DEB_PYTHON = Path("/usr/bin/python3")
#: Settings whose default is worked out where the relay runs (the host
#: name, paths under relay.state_dir, the installed model), so the shipped
#: file explains them instead of pinning a value.
COMPUTED_DEFAULTS = {
    "relay.relay_id",
    "filter.model",
    "filter.canary_rows_path",
    "spool.dir",
}

pytestmark = pytest.mark.slow


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (a Debian tool: apt-get install dpkg)")
    return path


def _pyproject() -> dict[str, Any]:
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)


def _python_version(python: Path) -> str:
    out = subprocess.run(
        [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


@dataclasses.dataclass(frozen=True)
class BuiltDeb:
    path: Path
    root: Path  # where it was extracted

    @property
    def prefix(self) -> Path:
        return self.root / PREFIX.lstrip("/")

    @property
    def python(self) -> Path:
        return self.prefix / "bin" / "python"

    def site_packages(self) -> Path:
        (site,) = self.prefix.glob("lib/python*/site-packages")
        return site

    def sampleflow(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run the packaged ``bin/sampleflow`` script with the venv's python."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SAMPLEFLOW_")}
        env.update(kwargs.pop("env", {}))
        return subprocess.run(
            [self.python, "-B", self.prefix / "bin" / "sampleflow", *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            **kwargs,
        )


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> BuiltDeb:
    """The package, built once for this module, and its extracted tree."""
    _require("dpkg-deb")
    if not DEB_PYTHON.exists():
        pytest.skip(f"{DEB_PYTHON} (Debian's python3, with python3-venv) is missing")
    out = tmp_path_factory.mktemp("deb")
    result = subprocess.run(
        [
            DEB_PYTHON,
            PACKAGING / "deb" / "build.py",
            "--out",
            out,
            "--compression",
            "gzip",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    path = Path(result.stdout.strip().splitlines()[-1])
    root = tmp_path_factory.mktemp("extracted")
    subprocess.run(["dpkg-deb", "-x", path, root], check=True)
    return BuiltDeb(path, root)


def _field(deb: BuiltDeb, name: str) -> str:
    out = subprocess.run(
        ["dpkg-deb", "--field", deb.path, name],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


# -- the package's metadata ---------------------------------------------------


def test_deb_is_named_and_described_for_this_build(deb: BuiltDeb) -> None:
    """The file is sampleflow-relay_<project version>_<dpkg arch>.deb and its
    control fields say the same, with a dependency on the exact python3.X
    the venv was made with."""
    version = _pyproject()["project"]["version"]
    arch = subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert deb.path.name == f"sampleflow-relay_{version}_{arch}.deb"
    assert _field(deb, "Package") == "sampleflow-relay"
    assert _field(deb, "Version") == version
    assert _field(deb, "Architecture") == arch
    depends = [d.strip() for d in _field(deb, "Depends").split(",")]
    python = f"python{_python_version(DEB_PYTHON)}"
    assert python in depends
    assert "adduser" in depends
    # The venv's interpreter is that python, by its versioned name (a new
    # default python3 after an upgrade must not be picked up).
    assert os.path.realpath(deb.python) == f"/usr/bin/{python}"
    libc = [d for d in depends if d.startswith("libc6 ")]
    assert len(libc) == 1
    needed = tuple(int(x) for x in re.findall(r"\(>= (\d+)\.(\d+)\)", libc[0])[0])
    here = os.confstr("CS_GNU_LIBC_VERSION") or "glibc 0.0"
    have = tuple(int(x) for x in here.split()[1].split(".")[:2])
    assert (2, 17) <= needed <= have  # the venv's wheels were chosen for this host


def test_installed_size_matches_the_tree(deb: BuiltDeb) -> None:
    """Installed-Size (KiB) is within 5% of what the extracted files take."""
    total = sum(
        p.stat().st_size
        for p in deb.root.rglob("*")
        if p.is_file() and not p.is_symlink()
    )
    declared = int(_field(deb, "Installed-Size"))
    assert abs(declared - total / 1024) <= 0.05 * declared


def test_conffiles_are_the_settings_and_the_environment(deb: BuiltDeb) -> None:
    """Both /etc files are conffiles (dpkg keeps an administrator's edits),
    and the environment file, which may hold credentials, is 0600."""
    out = subprocess.run(
        ["dpkg-deb", "--info", deb.path, "conffiles"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert sorted(out) == [
        "/etc/default/sampleflow-relay",
        "/etc/sampleflow/relay.toml",
    ]
    for name in out:
        assert (deb.root / name.lstrip("/")).is_file()
    mode = (deb.root / "etc/default/sampleflow-relay").stat().st_mode & 0o777
    assert mode == 0o600


def test_contents_layout(deb: BuiltDeb) -> None:
    """The listing has the command symlink, the unit, the man page, files
    owned by root, and no byte-code (the postinst writes it)."""
    listing = subprocess.run(
        ["dpkg-deb", "--contents", deb.path], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    names = {line.split()[5] for line in listing}
    assert "./lib/systemd/system/sampleflow-relay.service" in names
    assert "./usr/share/man/man1/sampleflow.1.gz" in names
    assert "./usr/share/doc/sampleflow-relay/copyright" in names
    symlinks = [line for line in listing if line.startswith("l")]
    assert any(
        line.endswith("./usr/bin/sampleflow -> /opt/sampleflow-relay/bin/sampleflow")
        for line in symlinks
    )
    assert all(line.split()[1] == "root/root" for line in listing)
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_maintainer_scripts_are_strict_posix_sh(deb: BuiltDeb) -> None:
    """postinst, prerm and postrm are /bin/sh scripts with set -e that parse."""
    control = deb.root.parent / (deb.root.name + "-control")
    subprocess.run(["dpkg-deb", "-e", deb.path, control], check=True)
    for name in ("postinst", "prerm", "postrm"):
        script = control / name
        text = script.read_text()
        assert text.startswith("#!/bin/sh\n")
        assert "\nset -e\n" in text
        assert script.stat().st_mode & 0o111
        subprocess.run(["sh", "-n", script], check=True)
    postinst = (control / "postinst").read_text()
    # Idempotent: the user and the folder are only made when missing.
    assert "getent passwd sampleflow" in postinst
    assert '[ ! -d "$STATE" ]' in postinst


# -- the unit -------------------------------------------------------------------


def _unit_keys(text: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_unit_runs_the_relay_hardened(deb: BuiltDeb) -> None:
    """The unit runs relay run on the shipped settings as the sampleflow
    user, keeps the spool in its state folder, restarts on failure but not
    on a configuration error, and grants no capability."""
    unit = _unit_keys(
        (deb.root / "lib/systemd/system/sampleflow-relay.service").read_text()
    )
    service = unit["Service"]
    state_dir = Path(_setting_default("relay", "state_dir"))
    assert service["ExecStart"] == [
        f"{PREFIX}/bin/sampleflow relay run --config /etc/sampleflow/relay.toml"
    ]
    assert service["User"] == ["sampleflow"]
    assert service["StateDirectory"] == [state_dir.name]
    assert state_dir.parent == Path("/var/lib")
    assert service["Restart"] == ["on-failure"]
    assert service["RestartPreventExitStatus"] == ["2"]
    assert service["NoNewPrivileges"] == ["yes"]
    assert service["ProtectSystem"] == ["strict"]
    assert service["ReadWritePaths"] == [str(state_dir)]
    assert service["CapabilityBoundingSet"] == [""]
    assert service.get("AmbientCapabilities", [""]) == [""]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def _setting_default(section: str, key: str) -> Any:
    """A setting's default, asked of the relay's settings code."""
    for cls in relay_config.SECTIONS:
        if section == cls.SECTION:  # type: ignore[attr-defined]
            (field,) = (f for f in dataclasses.fields(cls) if f.name == key)
            return field.default
    raise KeyError(section)


def test_unit_passes_systemd_analyze(deb: BuiltDeb, tmp_path: Path) -> None:
    """systemd-analyze verify accepts the unit without a warning (its
    ExecStart pointed at the extracted tree, since verify checks that the
    program exists), and its offline security review rates it OK."""
    analyze = _require("systemd-analyze")
    text = (deb.root / "lib/systemd/system/sampleflow-relay.service").read_text()
    unit = tmp_path / "sampleflow-relay.service"
    unit.write_text(text.replace(PREFIX, str(deb.prefix)))
    verify = subprocess.run(
        [analyze, "verify", "--man=no", unit],
        check=False,
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stderr
    assert verify.stderr.strip() == ""
    # Exposure is 0.0 (locked down) to 10.0; above 2.5 fails the check.
    security = subprocess.run(
        [analyze, "security", "--offline=true", "--threshold=25", unit],
        check=False,
        capture_output=True,
        text=True,
    )
    assert security.returncode == 0, security.stdout[-2000:]
    assert re.search(r"Overall exposure level .*: \d\.\d OK", security.stdout)


# -- the embedded relay -------------------------------------------------------


def test_venv_runs_the_command_from_the_extracted_tree(deb: BuiltDeb) -> None:
    """bin/sampleflow (whose #! names the /opt venv) runs with the venv's
    python: --help lists the edge commands, relay lists its three, and a
    cloud command says it is not in this install."""
    script = (deb.prefix / "bin" / "sampleflow").read_text()
    assert script.startswith(f"#!{PREFIX}/bin/python\n")
    top = deb.sampleflow("--help")
    assert top.returncode == 0, top.stderr
    for command in ("decode", "relay", "bench"):
        assert re.search(rf"^\s+{command}\s", top.stdout, re.M), top.stdout
    relay = deb.sampleflow("relay", "--help")
    for command in ("run", "check-config", "status"):
        assert command in relay.stdout
    engine = deb.sampleflow("engine", "run")
    assert engine.returncode == 2
    assert "not available in this install" in engine.stderr
    modelsync = subprocess.run(
        [deb.python, "-B", "-m", "edge_agent.modelsync", "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert modelsync.returncode == 0, modelsync.stderr
    assert "install-local" in modelsync.stdout


def test_venv_holds_the_relay_and_no_cloud_dependencies(deb: BuiltDeb) -> None:
    """The venv has the relay's runtime (numpy, LiteRT, boto3, awsiotsdk) but
    no Spark, web framework, cloud package, pip or setuptools."""
    site = deb.site_packages()
    dists = {
        re.sub(r"-[^-]+\.dist-info$", "", p.name).lower().replace("_", "-")
        for p in site.glob("*.dist-info")
    }
    for wanted in ("sampleflow", "numpy", "ai-edge-litert", "boto3", "awsiotsdk"):
        assert wanted in dists
    for unwanted in (
        "pyspark",
        "fastapi",
        "uvicorn",
        "pandas",
        "pyarrow",
        "pymongo",
        "pip",
        "setuptools",
    ):
        assert unwanted not in dists
    assert not (site / "cloud").exists()
    assert (site / "edge_agent" / "relay").is_dir()


def _check_config(deb: BuiltDeb, path: Path) -> dict[str, tuple[str | None, str]]:
    """relay check-config's output: {section.key: (TOML value or None, source)}."""
    result = deb.sampleflow("relay", "check-config", str(path))
    assert result.returncode == 0, result.stderr
    settings: dict[str, tuple[str | None, str]] = {}
    section = ""
    for line in result.stdout.splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif match := re.match(r"# (\w+) is not set  # (.*)$", line):
            settings[f"{section}.{match[1]}"] = (None, match[2])
        elif line:
            assignment, _, source = line.rpartition("  # ")
            key, _, value = assignment.partition(" = ")
            settings[f"{section}.{key}"] = (value, source)
    return settings


def _toml(value: str) -> Any:
    return tomllib.loads(f"v = {value}")["v"]


def test_shipped_settings_list_every_setting_at_its_default(
    deb: BuiltDeb, tmp_path: Path
) -> None:
    """relay.toml sets nothing (check-config reports every setting from its
    default), names every setting check-config knows, each at the value
    check-config gives; uncommenting all of them changes no value."""
    shipped = deb.root / "etc/sampleflow/relay.toml"
    text = shipped.read_text()
    effective = _check_config(deb, shipped)
    assert all(source.startswith("default") for _, source in effective.values())

    commented: dict[str, str] = {}
    section = ""
    for line in text.splitlines():
        if match := re.match(r"^(?:# )?\[(\w+)\]$", line):
            section = match[1]
        elif match := re.match(r"^# (\w+) = (.*)$", line):
            commented[f"{section}.{match[1]}"] = match[2]
    for key, (value, _) in effective.items():
        if key == "modelsync.enabled":
            continue  # the section is commented out as a whole
        assert key in commented, f"{key} missing from the shipped relay.toml"
        if key in COMPUTED_DEFAULTS or value is None:
            assert commented[key].startswith("("), (key, commented[key])
        else:
            assert _toml(commented[key]) == _toml(value), key

    # Uncomment every value line of the relay's own sections.
    lines = []
    section = ""
    for line in text.splitlines():
        if match := re.match(r"^(?:# )?\[(\w+)\]$", line):
            section = match[1]
        value_line = re.match(r"^# (\w+ = [^(].*)$", line)
        uncomment = value_line is not None and section != "modelsync"
        lines.append(value_line[1] if value_line and uncomment else line)
    uncommented = tmp_path / "relay.toml"
    uncommented.write_text("\n".join(lines) + "\n")
    from_file = _check_config(deb, uncommented)
    assert from_file.keys() == effective.keys()
    changed = 0
    for key, (value, source) in from_file.items():
        assert value == effective[key][0], key
        changed += source.startswith("file")
    set_in_file = sum(
        1
        for key, value in commented.items()
        if not value.startswith("(") and not key.startswith("modelsync.")
    )
    assert changed == set_in_file > 20


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _netflow_v5_datagram() -> bytes:
    """One NetFlow v5 record, packed by hand from the v5 layout."""
    header = struct.pack("!HHIIIIBBH", 5, 1, 60_000, int(time.time()), 0, 0, 0, 0, 0)
    record = struct.pack(
        "!4s4s4sHHIIIIHHBBBBHHBBH",
        socket.inet_aton("192.168.1.10"),
        socket.inet_aton("198.51.100.7"),
        socket.inet_aton("0.0.0.0"),
        1,
        2,
        3,  # packets
        180,  # bytes
        59_000,
        59_900,
        40_000,
        443,
        0,
        0x12,
        6,
        0,
        0,
        0,
        24,
        24,
        0,
    )
    return header + record


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def packaged_relay(deb: BuiltDeb, tmp_path: Path) -> Iterator[tuple[int, int]]:
    """The packaged relay running from the extracted tree on free ports,
    shipping to a closed local port; yields (udp port, metrics port)."""
    udp_port = _free_port(socket.SOCK_DGRAM)
    metrics_port = _free_port(socket.SOCK_STREAM)
    closed_port = _free_port(socket.SOCK_STREAM)
    config = tmp_path / "relay.toml"
    config.write_text(
        "[relay]\n"
        'tenant_id = "acme"\n'
        'relay_id = "gw-test"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        "[collector]\n"
        'listen_addresses = ["127.0.0.1"]\n'
        f"ports = [{udp_port}]\n"
        "rcvbuf_bytes = 262144\n"
        "[kinesis]\n"
        'region = "us-east-1"\n'
        f'endpoint_url = "http://127.0.0.1:{closed_port}"\n'
        "[metrics]\n"
        f"port = {metrics_port}\n"
    )
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("SAMPLEFLOW_", "AWS_"))
    }
    env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    process = subprocess.Popen(
        [
            deb.python,
            "-B",
            deb.prefix / "bin/sampleflow",
            "relay",
            "run",
            "--config",
            config,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        url = f"http://127.0.0.1:{metrics_port}/healthz"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if _get(url)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        if process.poll() is not None:
            assert process.stderr is not None
            pytest.fail(f"relay exited {process.returncode}: {process.stderr.read()}")
        yield udp_port, metrics_port
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        process.stdout.close()  # type: ignore[union-attr]
        process.stderr.close()  # type: ignore[union-attr]
    assert process.returncode == 0


def test_packaged_relay_serves_healthz_and_counts_a_datagram(
    packaged_relay: tuple[int, int],
) -> None:
    """The extracted relay starts (the shipped model found under the venv's
    share/), answers /healthz with 200 (the container's health check), and
    counts one NetFlow v5 datagram and its record; SIGTERM stops it with 0."""
    udp_port, metrics_port = packaged_relay
    manifest = json.loads(
        (ROOT / "models/relay-ctu13s6-r100-w300.manifest.json").read_text()
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(_netflow_v5_datagram(), ("127.0.0.1", udp_port))
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    deadline = time.monotonic() + 30
    text = ""
    while time.monotonic() < deadline:
        text = _get(url)[1]
        if re.search(
            r"^sampleflow_relay_exporter_records_total\{.*\} 1\.0$", text, re.M
        ):
            break
        time.sleep(0.2)
    datagrams = re.findall(
        rf'^sampleflow_relay_datagrams_total\{{port="{udp_port}"\}} (\S+)$', text, re.M
    )
    assert datagrams == ["1.0"], text[-3000:]
    assert re.search(
        r"^sampleflow_relay_exporter_records_total\{.*\} 1\.0$", text, re.M
    )
    # The filter names its model name:version:first 12 digits of its sha256.
    model = f"{manifest['name']}:{manifest['version']}:{manifest['sha256'][:12]}"
    assert f'sampleflow_relay_filter_model_info{{version="{model}"}} 1.0' in text
    assert _get(f"http://127.0.0.1:{metrics_port}/healthz")[0] == 200


# -- lintian ------------------------------------------------------------------


def test_lintian_finds_no_error_or_warning(deb: BuiltDeb) -> None:
    """lintian passes the package at error and warning level (the overrides
    it ships, usr/share/lintian/overrides, each carry their reason)."""
    lintian = shutil.which("lintian")
    if lintian is None:
        pytest.skip("lintian is not installed (apt-get install lintian)")
    result = subprocess.run(
        [lintian, "--fail-on", "error,warning", deb.path],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    flagged = [line for line in result.stdout.splitlines() if line[:2] in ("E:", "W:")]
    assert result.returncode == 0 and not flagged, "\n".join(flagged[:50])


# -- the container image ------------------------------------------------------


def _dockerfile() -> list[Any]:
    dockerfile = pytest.importorskip("dockerfile")
    return list(dockerfile.parse_file(str(PACKAGING / "container" / "Dockerfile")))


def _dockerignore_allows(path: str) -> bool:
    """Docker's rule: the last matching .dockerignore pattern decides."""
    allowed = True
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatch(p, pattern[3:]) for p in parts)
        else:
            hit = any(fnmatch.fnmatch(p, pattern) for p in prefixes)
        if hit:
            allowed = negate
    return allowed


def test_dockerfile_copies_only_what_exists_and_is_in_the_context() -> None:
    """Every COPY source of the build stage exists in the tree and is not
    left out of the build context by .dockerignore."""
    commands = _dockerfile()
    copies = [c for c in commands if c.cmd == "COPY" and not c.flags]
    assert copies
    for copy in copies:
        for source in copy.value[:-1]:
            path = source.rstrip("/")
            assert (ROOT / path).exists(), source
            assert _dockerignore_allows(path), source
    # The image is built from the same sources as the Debian package, whose
    # build the tests above run.
    spec = importlib.util.spec_from_file_location(
        "deb_build", PACKAGING / "deb" / "build.py"
    )
    assert spec is not None and spec.loader is not None
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    sources = {s.rstrip("/") for c in copies for s in c.value[:-1]}
    assert sources == {*build.SOURCES, "packaging/render_config.py"}
    assert not _dockerignore_allows("tests/test_packaging.py")
    assert not _dockerignore_allows("cloud/engine/store.py")
    assert not _dockerignore_allows("edge_agent/__pycache__")


def test_dockerfile_is_a_relay_only_non_root_image() -> None:
    """Two stages on the pinned python:3.11-slim tag, the base install (no
    extra), a non-root user, the state folder as a volume, the flow ports
    and the metrics port exposed, /healthz as the health check, and relay
    run as the entry point."""
    commands = _dockerfile()
    (arg,) = [c for c in commands if c.cmd == "ARG"]
    name, _, image = arg.value[0].partition("=")
    assert re.fullmatch(r"python:3\.11-slim(-[a-z]+)?", image)
    froms = [c for c in commands if c.cmd == "FROM"]
    assert [f.value[0] for f in froms] == [f"${{{name}}}"] * 2
    runs = " && ".join(" ".join(c.value) for c in commands if c.cmd == "RUN")
    installs = re.findall(r"pip install (\S+)", runs)
    assert installs == ["."]  # the project itself, no [cloud] extra
    final = commands[commands.index(froms[1]) :]
    (user,) = [c.value[0] for c in final if c.cmd == "USER"]
    assert user.split(":")[0] not in ("root", "0")
    (volume,) = [c.value for c in final if c.cmd == "VOLUME"]
    assert list(volume) == [str(_setting_default("relay", "state_dir"))]
    (expose,) = [c.value for c in final if c.cmd == "EXPOSE"]
    ports = _setting_default("collector", "ports")
    metrics = _setting_default("metrics", "port")
    assert set(expose) == {f"{p}/udp" for p in ports} | {f"{metrics}/tcp"}
    (health,) = [c for c in final if c.cmd == "HEALTHCHECK"]
    assert health.value[0] == "CMD"
    assert "/healthz" in health.value[-1] and f"'{metrics}'" in health.value[-1]
    (entry,) = [c for c in final if c.cmd == "ENTRYPOINT"]
    assert entry.json and list(entry.value) == ["sampleflow", "relay", "run"]
    (env_values,) = [c.value for c in final if c.cmd == "ENV"]
    env = dict(zip(env_values[::2], env_values[1::2], strict=True))
    assert env["SAMPLEFLOW_METRICS_LISTEN_ADDRESS"] == "0.0.0.0"


# -- the maintainer scripts, in a real dpkg -----------------------------------

CHROOT_ENV = "SAMPLEFLOW_DEB_CHROOT"


def _in_root(root: Path, script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["chroot", root, "/bin/sh", "-c", script],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"},
    )


def test_install_reinstall_remove_purge_in_a_debian_root(deb: BuiltDeb) -> None:
    """In a minimal Debian root (opt-in: $SAMPLEFLOW_DEB_CHROOT, made with
    debootstrap), dpkg installs the package (user, 0750 state folder,
    byte-code, unit enabled, the real /usr/bin/sampleflow runs), a
    reinstall keeps an edited relay.toml, remove leaves no file under /opt
    but keeps settings and state, and purge deletes both."""
    if not os.environ.get(CHROOT_ENV):
        pytest.skip(
            f"opt-in: set {CHROOT_ENV} to a Debian root made with 'debootstrap "
            "--variant=minbase --include=python3.11,adduser,init-system-helpers "
            "bookworm DIR' (needs root)"
        )
    root = Path(os.environ[CHROOT_ENV])
    shutil.copy(deb.path, root / "tmp" / deb.path.name)
    pkg = f"/tmp/{deb.path.name}"
    _in_root(root, "dpkg -P sampleflow-relay")  # a run stopped half-way
    step = _in_root(
        root,
        f"set -e; dpkg -i {pkg}; getent passwd sampleflow;"
        " stat -c '%a %U' /var/lib/sampleflow;"
        " find /opt/sampleflow-relay -name '*.pyc' | wc -l;"
        " readlink /etc/systemd/system/multi-user.target.wants/"
        "sampleflow-relay.service;"
        " sampleflow relay check-config /etc/sampleflow/relay.toml",
    )
    assert step.returncode == 0, step.stderr
    assert "sampleflow:x:" in step.stdout
    assert "750 sampleflow" in step.stdout
    pyc = re.search(r"^(\d+)$", step.stdout, re.M)
    assert pyc is not None and int(pyc[1]) > 500  # the postinst compiled
    assert "/lib/systemd/system/sampleflow-relay.service" in step.stdout
    assert "[relay]\n# tenant_id is not set  # default" in step.stdout

    step = _in_root(
        root,
        "set -e; sed -i 's/^# tenant_id = .*/tenant_id = \"acme\"/'"
        f" /etc/sampleflow/relay.toml; dpkg -i {pkg};"
        " sampleflow relay check-config /etc/sampleflow/relay.toml",
    )
    assert step.returncode == 0, step.stderr
    assert 'tenant_id = "acme"  # file /etc/sampleflow/relay.toml' in step.stdout

    step = _in_root(
        root,
        "set -e; dpkg -r sampleflow-relay; ! test -e /opt/sampleflow-relay;"
        " ! test -e /usr/bin/sampleflow; test -d /var/lib/sampleflow;"
        " ls /etc/sampleflow",
    )
    # Nothing is left under /opt (the prerm removed the byte-code).
    assert step.returncode == 0, step.stderr
    assert "relay.toml" in step.stdout

    step = _in_root(
        root,
        "set -e; dpkg -P sampleflow-relay; ! test -e /etc/sampleflow;"
        " ! test -e /var/lib/sampleflow; ! test -e /etc/default/sampleflow-relay;"
        " getent passwd sampleflow",
    )
    assert step.returncode == 0, step.stderr
    assert "sampleflow:x:" in step.stdout  # Debian keeps system users
