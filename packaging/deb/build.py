"""Build ``sampleflow-relay_<version>_<arch>.deb``: the relay in its own venv.

Run with the Debian Python the package will depend on (standard library
only, no sampleflow needed)::

    /usr/bin/python3 packaging/deb/build.py --out dist/

What it does, in order:

1. builds a wheel of the project from a copy of its sources (so the work
   tree gets no ``build/`` or ``*.egg-info``), unless ``--wheel`` names one;
2. creates a virtualenv with that Python and installs the wheel with its
   base dependencies only (the relay: no cloud extra) from the package
   registries: this is the only step that downloads, and only at build
   time;
3. moves the venv's absolute paths (script shebangs, activate scripts)
   from the build folder to ``/opt/sampleflow-relay`` and fails if any
   build path is left;
4. lays out the unit, the settings file (rendered from the code's
   defaults by ``packaging/render_config.py``), the maintainer scripts and
   the control file, and runs ``dpkg-deb``.

The venv holds compiled extensions (numpy, LiteRT, awscrt, cryptography),
so the package is for the architecture it was built on
(``dpkg --print-architecture``): build the arm64 package on an arm64
machine or in an arm64 build container.  No byte-code is shipped; the
postinst compiles it and the prerm removes it (Debian's own practice).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

PACKAGE = "sampleflow-relay"
PREFIX = Path("/opt/sampleflow-relay")
HERE = Path(__file__).resolve().parent
PACKAGING = HERE.parent
#: What the wheel is built from: the edge package and its model, not
#: ``cloud/`` (a gateway has no use for it; the cloud commands then say
#: they are not available in this install).
SOURCES = ("pyproject.toml", "README.md", "edge_agent", "models")
#: Installed with the venv by ensurepip; not needed at run time, and the
#: service could not use them anyway (dpkg owns the files, /opt is read-only).
BUILD_ONLY = ("pip", "setuptools")
DEFAULT_MAINTAINER = "sampleflow maintainers <maintainers@sampleflow.example>"
# manylinux tags name the oldest glibc a wheel runs on.
_LEGACY_MANYLINUX = {"manylinux1": (2, 5), "manylinux2010": (2, 12)}
_LEGACY_MANYLINUX["manylinux2014"] = (2, 17)
_MANYLINUX_RE = re.compile(r"manylinux_(\d+)_(\d+)_")


class BuildError(RuntimeError):
    """A build step failed; the message says which and why."""


def run(cmd: Sequence[str | Path], env: Mapping[str, str] | None = None) -> str:
    """Run ``cmd``; its standard output, or BuildError with its stderr."""
    result = subprocess.run(
        [str(c) for c in cmd],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if result.returncode != 0:
        raise BuildError(
            f"{' '.join(map(str, cmd))} exited {result.returncode}:\n"
            f"{result.stdout[-2000:]}{result.stderr[-4000:]}"
        )
    return result.stdout


def step(message: str) -> None:
    print(f"build.py: {message}", file=sys.stderr, flush=True)


def project_version(root: Path) -> str:
    with open(root / "pyproject.toml", "rb") as fh:
        return str(tomllib.load(fh)["project"]["version"])


def build_wheel(python: Path, root: Path, work: Path) -> Path:
    """A wheel of the project, built from a copy of ``SOURCES``."""
    src = work / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        path = root / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    wheels = work / "wheels"
    run([python, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", wheels, src])
    (wheel,) = wheels.glob("sampleflow-*.whl")
    return wheel


def make_venv(
    python: Path, stage_prefix: Path, wheel: Path | None, root: Path, work: Path
) -> tuple[str, list[str]]:
    """Create the venv at ``stage_prefix``; (python version, pip freeze)."""
    run([python, "-m", "venv", stage_prefix])
    venv_python = stage_prefix / "bin" / "python"
    if wheel is None:
        step("building the project's wheel")
        wheel = build_wheel(venv_python, root, work)
    step(f"installing {wheel.name} and its base dependencies")
    constraint = os.environ.get("SAMPLEFLOW_DEB_CONSTRAINTS")
    extra = ["--constraint", constraint] if constraint else []
    run(
        [
            venv_python,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-compile",
            "--disable-pip-version-check",
            *extra,
            wheel,
        ]
    )
    freeze = run([venv_python, "-m", "pip", "freeze", "--all"]).splitlines()
    freeze = [
        line
        for line in freeze
        if not any(line.startswith(f"{name}==") for name in BUILD_ONLY)
    ]
    freeze = [re.sub(r" @ file://.*$", "", line) for line in freeze]
    run([venv_python, "-m", "pip", "uninstall", "--quiet", "-y", *BUILD_ONLY])
    version = run(
        [venv_python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"]
    ).strip()
    return version, freeze


def relocate(stage_prefix: Path) -> None:
    """Point the venv's absolute paths at PREFIX; fail on any left over."""
    old = str(stage_prefix).encode()
    new = str(PREFIX).encode()
    for path in (stage_prefix / "bin").iterdir():
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        if old in data:
            path.write_bytes(data.replace(old, new))
    cfg = stage_prefix / "pyvenv.cfg"
    cfg.write_bytes(cfg.read_bytes().replace(old, new))
    for pycache in list(stage_prefix.rglob("__pycache__")):
        shutil.rmtree(pycache)
    left = [p for p in files_under(stage_prefix) if old in p.read_bytes()]
    if left:
        raise BuildError(
            "build paths left in the venv (it would not run from "
            f"{PREFIX}): {', '.join(str(p) for p in left[:10])}"
        )


def files_under(top: Path) -> Iterator[Path]:
    for path in sorted(top.rglob("*")):
        if path.is_file() and not path.is_symlink():
            yield path


def glibc_needed(site_packages: Path) -> tuple[int, int] | None:
    """The newest glibc any installed wheel needs, from its manylinux tags.

    A wheel tagged for several policies runs on the oldest of them.
    """
    newest: tuple[int, int] | None = None
    for wheel_file in site_packages.glob("*.dist-info/WHEEL"):
        versions = []
        for line in wheel_file.read_text().splitlines():
            if not line.startswith("Tag:"):
                continue
            tag = line.split(":", 1)[1].strip().rsplit("-", 1)[-1]
            for platform in tag.split("."):
                match = _MANYLINUX_RE.match(platform)
                if match:
                    versions.append((int(match.group(1)), int(match.group(2))))
                for legacy, version in _LEGACY_MANYLINUX.items():
                    if platform.startswith(legacy + "_"):
                        versions.append(version)
        if versions:
            oldest = min(versions)
            newest = oldest if newest is None else max(newest, oldest)
    return newest


def normalise_modes(stage: Path, lib: Path) -> None:
    """0755 for folders and executables, 0644 for other files.

    Under ``lib`` (site-packages) only ELF programs stay executable:
    wheels mark shared objects and plain modules executable too, which
    nothing needs (Python maps extensions, never executes them).
    """
    for path in [stage, *stage.rglob("*")]:
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(0o755)
            continue
        executable = bool(path.stat().st_mode & 0o111)
        if executable and path.is_relative_to(lib):
            with open(path, "rb") as fh:
                is_elf = fh.read(4) == b"\x7fELF"
            executable = is_elf and ".so" not in path.name
        path.chmod(0o755 if executable else 0o644)


def remove_empty_dirs(top: Path) -> None:
    """Empty folders (the venv's include/) are noise in a package."""
    for path in sorted(top.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
            path.rmdir()


def write_manpage(stage_prefix: Path, man1: Path, version: str) -> None:
    """sampleflow(1) from the command's own --help texts."""
    python: list[str | Path] = [stage_prefix / "bin/python", "-B", "-m"]
    python.append("edge_agent.cli")
    sections: list[tuple[str, list[str]]] = [("sampleflow", [])]
    sections.append(("sampleflow relay", ["relay"]))
    for sub in ("run", "check-config", "status"):
        sections.append((f"sampleflow relay {sub}", ["relay", sub]))
    body = []
    for title, argv in sections:
        help_env = {**os.environ, "COLUMNS": "80"}
        text = run([*python, *argv, "--help"], env=help_env)
        text = text.replace("\\", "\\e")
        text = "\n".join(
            ("\\&" + line) if line.startswith((".", "'")) else line
            for line in text.splitlines()
        )
        body.append(f'.SS "{title}"\n.nf\n{text}\n.fi\n')
    page = (
        f'.TH SAMPLEFLOW 1 "" "sampleflow {version}" "User Commands"\n'
        ".SH NAME\nsampleflow \\- sampled network flow relay and tools\n"
        ".SH SYNOPSIS\n.B sampleflow relay run\n.RB [ \\-\\-config\n.IR FILE ]\n"
        ".SH DESCRIPTION\n" + "".join(body) + ".SH FILES\n"
        ".TP\n/etc/sampleflow/relay.toml\nsettings, every key at its default\n"
        ".TP\n/etc/default/sampleflow-relay\nthe service's environment\n"
        ".TP\n/var/lib/sampleflow\nspool, models, canary rows\n"
        ".SH SEE ALSO\n/usr/share/doc/sampleflow-relay/README.md\n"
    )
    man1.mkdir(parents=True)
    with (
        open(man1 / "sampleflow.1.gz", "wb") as raw,
        gzip.GzipFile(
            filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0
        ) as fh,
    ):
        fh.write(page.encode())


def write_changelog(doc: Path, version: str, maintainer: str, note: str) -> None:
    date = time.strftime(
        "%a, %d %b %Y %H:%M:%S +0000", time.gmtime(source_date_epoch())
    )
    text = (
        f"{PACKAGE} ({version}) unstable; urgency=medium\n\n"
        f"  * {note}\n\n -- {maintainer}  {date}\n"
    )
    with (
        open(doc / "changelog.gz", "wb") as raw,
        gzip.GzipFile(
            filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0
        ) as fh,
    ):
        fh.write(text.encode())


def source_date_epoch() -> int:
    return int(os.environ.get("SOURCE_DATE_EPOCH", time.time()))


def git_revision(root: Path) -> str:
    try:
        return run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"]).strip()
    except (BuildError, OSError):
        return "unknown"


def installed_size_kib(stage: Path) -> int:
    total = 0
    for path in stage.rglob("*"):
        if path.is_relative_to(stage / "DEBIAN"):
            continue
        total += (
            1 if path.is_dir() or path.is_symlink() else -(-path.stat().st_size // 1024)
        )
    return total


def control_text(
    version: str, arch: str, depends: list[str], size: int, maintainer: str
) -> str:
    return (
        f"Package: {PACKAGE}\n"
        f"Version: {version}\n"
        f"Architecture: {arch}\n"
        f"Maintainer: {maintainer}\n"
        f"Installed-Size: {size}\n"
        f"Depends: {', '.join(depends)}\n"
        "Section: net\n"
        "Priority: optional\n"
        "Description: sampleflow edge relay: sampled flow exports to Kinesis\n"
        " Receives NetFlow v5/v9, IPFIX and sFlow v5 exports on UDP (ports\n"
        " 2055, 4739, 6343), decodes and pre-aggregates the sampled flows,\n"
        " scores hosts with a small TFLite model and ships compressed batches\n"
        " to Amazon Kinesis, spooling to disk while Kinesis is out of reach.\n"
        " .\n"
        " The relay and its Python dependencies live in a private virtualenv\n"
        f" under {PREFIX}; the service is sampleflow-relay.service.\n"
    )


def md5sums(stage: Path) -> str:
    lines = []
    for path in files_under(stage):
        rel = path.relative_to(stage)
        if rel.parts[0] == "DEBIAN":
            continue
        lines.append(f"{hashlib.md5(path.read_bytes()).hexdigest()}  {rel}\n")
    return "".join(lines)


def build(args: argparse.Namespace) -> Path:
    root = Path(args.source).resolve()
    # The venv links to the versioned interpreter (python3.11, not
    # python3), the one the package depends on: a newer default python3
    # after a distribution upgrade must not be picked up by this venv.
    python = Path(os.path.realpath(args.python))
    version = project_version(root)
    arch = run(["dpkg", "--print-architecture"]).strip()
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sampleflow-deb-") as tmp:
        work = Path(tmp)
        stage = work / "root"
        stage_prefix = stage / PREFIX.relative_to("/")
        stage_prefix.parent.mkdir(parents=True)
        step(f"venv with {python} for {arch}")
        wheel = Path(args.wheel).resolve() if args.wheel else None
        py_version, freeze = make_venv(python, stage_prefix, wheel, root, work)
        relocate(stage_prefix)

        (stage / "usr/bin").mkdir(parents=True)
        (stage / "usr/bin/sampleflow").symlink_to(PREFIX / "bin" / "sampleflow")
        unit_dir = stage / "lib/systemd/system"
        unit_dir.mkdir(parents=True)
        shutil.copy(HERE / f"{PACKAGE}.service", unit_dir)
        etc = stage / "etc/sampleflow"
        etc.mkdir(parents=True)
        step("rendering relay.toml from the settings' defaults")
        (etc / "relay.toml").write_text(
            run([stage_prefix / "bin/python", "-B", PACKAGING / "render_config.py"])
        )
        (stage / "etc/default").mkdir(parents=True)
        shutil.copy(HERE / "default", stage / "etc/default" / PACKAGE)

        doc = stage / "usr/share/doc" / PACKAGE
        doc.mkdir(parents=True)
        shutil.copy(HERE / "copyright", doc / "copyright")
        shutil.copy(PACKAGING / "README.md", doc / "README.md")
        (doc / "installed-packages.txt").write_text("\n".join(freeze) + "\n")
        revision = git_revision(root)
        write_changelog(
            doc,
            version,
            args.maintainer,
            f"sampleflow {version}, git {revision}, Python {py_version}.",
        )
        overrides = stage / "usr/share/lintian/overrides"
        overrides.mkdir(parents=True)
        shutil.copy(HERE / "lintian-overrides", overrides / PACKAGE)

        debian = stage / "DEBIAN"
        debian.mkdir()
        for script in ("postinst", "prerm", "postrm"):
            shutil.copy(HERE / script, debian / script)
        (debian / "conffiles").write_text(
            f"/etc/default/{PACKAGE}\n/etc/sampleflow/relay.toml\n"
        )
        write_manpage(stage_prefix, stage / "usr/share/man/man1", version)
        remove_empty_dirs(stage_prefix)
        for pycache in list(stage_prefix.rglob("__pycache__")):
            shutil.rmtree(pycache)
        normalise_modes(stage, stage_prefix / "lib")
        for script in ("postinst", "prerm", "postrm"):
            (debian / script).chmod(0o755)
        # It may hold AWS credentials; systemd reads it as root.
        (stage / "etc/default" / PACKAGE).chmod(0o600)

        depends = [f"python{py_version}", "adduser"]
        glibc = glibc_needed(next(stage_prefix.glob("lib/python*/site-packages")))
        if glibc is not None:
            depends.insert(0, f"libc6 (>= {glibc[0]}.{glibc[1]})")
        (debian / "md5sums").write_text(md5sums(stage))
        (debian / "md5sums").chmod(0o644)
        (debian / "control").write_text(
            control_text(
                version, arch, depends, installed_size_kib(stage), args.maintainer
            )
        )
        (debian / "control").chmod(0o644)

        deb = out_dir / f"{PACKAGE}_{version}_{arch}.deb"
        step(f"dpkg-deb -Z{args.compression} -> {deb}")
        run(
            [
                "dpkg-deb",
                "--root-owner-group",
                f"-Z{args.compression}",
                "--build",
                stage,
                deb,
            ],
            env={**os.environ, "SOURCE_DATE_EPOCH": str(source_date_epoch())},
        )
    return deb


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Build the sampleflow-relay Debian package."
    )
    parser.add_argument("--out", default="dist", help="output folder (dist)")
    parser.add_argument(
        "--python",
        default=os.environ.get("SAMPLEFLOW_DEB_PYTHON", "/usr/bin/python3"),
        help="the Debian Python the venv is built with and depends on "
        "(/usr/bin/python3)",
    )
    parser.add_argument(
        "--wheel", help="install this wheel of the project instead of building one"
    )
    parser.add_argument(
        "--source",
        default=str(PACKAGING.parent),
        help="the project's checkout (default: the one this script is in)",
    )
    parser.add_argument(
        "--compression",
        default=os.environ.get("SAMPLEFLOW_DEB_COMPRESSION", "xz"),
        choices=("xz", "gzip", "zstd", "none"),
        help="dpkg-deb compressor (xz; zstd needs dpkg 1.21.18 to install)",
    )
    parser.add_argument(
        "--maintainer",
        default=os.environ.get("SAMPLEFLOW_DEB_MAINTAINER", DEFAULT_MAINTAINER),
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    python = Path(args.python)
    if not python.is_absolute() or not str(python).startswith("/usr/bin/"):
        print(
            f"build.py: --python {python}: use a Debian interpreter under "
            "/usr/bin (the venv links to it and the package depends on it)",
            file=sys.stderr,
        )
        return 2
    try:
        deb = build(args)
    except BuildError as exc:
        print(f"build.py: {exc}", file=sys.stderr)
        return 1
    print(deb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
