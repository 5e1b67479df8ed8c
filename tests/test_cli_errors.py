"""User and environment mistakes give one line on stderr, not a traceback.

Each test runs the real command line (``python -m edge_agent.cli``, what the
``sampleflow`` script runs) as a subprocess: the behaviour under test is the
process's exit code and what it prints.  A message is
``sampleflow <command>: error: <what>``; exit 1 for a runtime failure, 2 for
a usage error; ``SAMPLEFLOW_DEBUG=1`` or ``--debug`` shows the traceback.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import DUMMY_AWS_ENV, MiniStack

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SAMPLEFLOW = [sys.executable, "-m", "edge_agent.cli"]
#: The command line with some modules made unimportable, as on an install
#: without them: ``sys.modules[name] = None`` is Python's documented way to
#: make ``import name`` raise ModuleNotFoundError.  First argument: the
#: comma-separated module names.
WITHOUT_MODULES = [
    sys.executable,
    "-c",
    "import sys\n"
    "for name in sys.argv.pop(1).split(','):\n"
    "    sys.modules[name] = None\n"
    "from edge_agent.cli import main\n"
    "sys.exit(main())\n",
]
TIMEOUT_S = 120


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without SAMPLEFLOW_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAMPLEFLOW_")}
    env.update(extra)
    return env


def run_command(
    argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as its own process, no stdin, output captured as text
    (by default: in the project root, the environment of :func:`clean_env`)."""
    return subprocess.run(
        argv,
        capture_output=True,
        check=False,
        text=True,
        timeout=TIMEOUT_S,
        env=env or clean_env(),
        cwd=cwd or PROJECT_ROOT,
        stdin=subprocess.DEVNULL,
    )


def sampleflow(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``sampleflow ARGS`` (see :func:`run_command`)."""
    return run_command([*SAMPLEFLOW, *args], env, cwd)


def assert_one_line(result: subprocess.CompletedProcess[str], prefix: str) -> str:
    """The error is one stderr line starting with ``prefix``; returns it."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(prefix), result.stderr
    return lines[0]


def error_line(code: int, *args: str, env: dict[str, str] | None = None) -> str:
    """Run ``sampleflow ARGS``, check it exits ``code`` with one stderr line
    ``sampleflow <command> <subcommand>: error: ...`` (the first two of
    ``args``) and return that line."""
    result = sampleflow(*args, env=env)
    assert result.returncode == code, result.stderr
    return assert_one_line(result, f"sampleflow {args[0]} {args[1]}: error: ")


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback TCP port held by a listening socket for the test."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


# -- the top-level net -------------------------------------------------------


def test_unwritable_output_is_one_line_and_debug_shows_the_traceback(
    tmp_path: Path,
) -> None:
    """An OSError no command handles (openapi --out into a missing folder)
    is one line naming the file, exit 1; SAMPLEFLOW_DEBUG=1 and --debug show
    the traceback instead."""
    out = tmp_path / "missing" / "openapi.json"
    line = error_line(1, "model-service", "openapi", "--out", str(out))
    assert str(out) in line and "No such file or directory" in line
    for run in (
        sampleflow(
            "model-service",
            "openapi",
            "--out",
            str(out),
            env=clean_env(SAMPLEFLOW_DEBUG="1"),
        ),
        sampleflow("--debug", "model-service", "openapi", "--out", str(out)),
    ):
        assert run.returncode == 1
        assert "Traceback" in run.stderr and "FileNotFoundError" in run.stderr


@pytest.mark.parametrize(
    ("missing", "args", "command"),
    [
        ("uvicorn", ["model-service", "run", "--port", "0"], "model-service run"),
        ("pyarrow", ["engine", "run", "--stream", "s", "--checkpoint", "c"],
         "engine run"),
        ("pyarrow", ["bench", "engine"], "bench engine"),
        ("pydantic_core", ["bench", "model-service"], "bench model-service"),
    ],
)  # fmt: skip
def test_missing_cloud_extra_is_named_with_the_install_command(
    tmp_path: Path, missing: str, args: list[str], command: str
) -> None:
    """A cloud command whose dependency is not installed (a relay-only
    install) says to install the cloud extra and names the module, exit 1."""
    result = run_command([*WITHOUT_MODULES, missing, *args], cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    line = assert_one_line(result, f"sampleflow {command}: error: ")
    assert "pip install 'sampleflow[cloud]'" in line
    assert f"module {missing} is not installed" in line


class _HeldMetrics(http.server.BaseHTTPRequestHandler):
    """Answers /metrics only once ``release`` is set."""

    release = threading.Event()

    def do_GET(self) -> None:
        self.release.wait(TIMEOUT_S)
        body = b"sampleflow_relay_uptime_seconds 5.0\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_status_into_a_closed_pipe_exits_quietly() -> None:
    """relay status whose stdout reader has gone (``| head``) exits 1 with
    nothing on stderr.  The metrics server answers only after the test has
    closed its end of the pipe, so the write always meets a closed pipe."""
    _HeldMetrics.release.clear()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HeldMetrics)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        proc = subprocess.Popen(
            [
                *SAMPLEFLOW,
                "relay",
                "status",
                "--url",
                f"http://127.0.0.1:{server.server_address[1]}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=clean_env(),
            cwd=PROJECT_ROOT,
        )
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        _HeldMetrics.release.set()
        err = proc.stderr.read().decode()
        proc.stderr.close()
        assert proc.wait(TIMEOUT_S) == 1
        assert err == ""
    finally:
        server.shutdown()
        server.server_close()


# -- errors fixed where they arise -----------------------------------------------


def test_status_of_a_relay_that_does_not_answer() -> None:
    """relay status of a closed port: one line naming the URL, exit 1."""
    line = error_line(1, "relay", "status", "--url", "http://127.0.0.1:1")
    assert "cannot read http://127.0.0.1:1/metrics" in line


def test_status_with_a_url_that_is_not_one() -> None:
    """relay status --url notaurl is a usage error (2) naming the URL."""
    line = error_line(2, "relay", "status", "--url", "notaurl")
    assert "'notaurl'" in line and "http://" in line


def test_keygen_into_a_missing_folder() -> None:
    """models keygen --private /nonexistent/dir/x.pem: one line naming the
    folder, exit 1."""
    line = error_line(
        1,
        "models",
        "keygen",
        "--private",
        "/nonexistent/dir/x.pem",
        "--public",
        "/nonexistent/dir/p.pem",
    )
    assert "/nonexistent/dir does not exist" in line


def test_models_status_against_a_closed_port() -> None:
    """models status --endpoint-url http://127.0.0.1:1: one line naming the
    URL, exit 1."""
    line = error_line(
        1,
        "models",
        "status",
        "job-1",
        "--endpoint-url",
        "http://127.0.0.1:1",
        "--region",
        "us-east-1",
        env=clean_env(**DUMMY_AWS_ENV),
    )
    assert "http://127.0.0.1:1/jobs/job-1" in line


def test_evaluate_a_missing_manifest() -> None:
    """models evaluate /nonexistent.json: one line naming the file, exit 1."""
    line = error_line(1, "models", "evaluate", "/nonexistent.json")
    assert "/nonexistent.json" in line


def test_evaluate_without_the_dataset_says_how_to_name_it(tmp_path: Path) -> None:
    """models evaluate of a shipped model with the CTU-13 folder absent
    names the folder searched and the --data option, exit 1."""
    manifest = PROJECT_ROOT / "models" / "relay-ctu13s6-r100-w300.manifest.json"
    result = sampleflow(
        "models",
        "evaluate",
        str(manifest),
        env=clean_env(SAMPLEFLOW_CTU13_DIR=str(tmp_path)),
    )
    assert result.returncode == 1
    line = assert_one_line(result, "sampleflow models evaluate: error: ")
    assert str(tmp_path) in line and "--data" in line


def test_model_service_port_out_of_range() -> None:
    """model-service run --port 70000 is a usage error (2) giving the range."""
    result = sampleflow("model-service", "run", "--port", "70000")
    assert result.returncode == 2
    assert "port must be 0 to 65535, got 70000" in result.stderr
    assert "Traceback" not in result.stderr


def test_model_service_port_in_use_fails_before_starting(taken_port: int) -> None:
    """model-service run on a port another socket holds exits 1 naming the
    address, without first logging that it started."""
    result = sampleflow("model-service", "run", "--port", str(taken_port))
    assert result.returncode == 1
    line = assert_one_line(result, "sampleflow model-service run: error: ")
    assert f"cannot listen on 127.0.0.1:{taken_port}: Address already in use" in line
    assert "model_service_started" not in result.stdout + result.stderr


def test_engine_run_refuses_a_mongo_uri_of_another_scheme() -> None:
    """engine run --mongo-uri foo://x is a usage error (2) naming the URI,
    before Spark starts."""
    result = sampleflow(
        "engine", "run", "--stream", "s", "--checkpoint", "c", "--mongo-uri", "foo://x"
    )
    assert result.returncode == 2
    assert "'foo://x' is not a mongodb:// or mongodb+srv:// URI" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("content", [None, "{}", "{not json"])
def test_modelsync_agent_with_a_bad_config(tmp_path: Path, content: str | None) -> None:
    """python -m edge_agent.modelsync run --config FILE with FILE missing,
    empty of settings or not JSON: one line naming the file, exit 2."""
    config = tmp_path / "modelsync.json"
    if content is not None:
        config.write_text(content)
    result = run_command(
        [sys.executable, "-m", "edge_agent.modelsync", "run", "--config", str(config)]
    )
    assert result.returncode == 2
    line = assert_one_line(result, "python -m edge_agent.modelsync run: error: ")
    assert str(config) in line
    if content == "{}":
        assert "modelsync.thing_name=None: is required" in line


# -- relay start-up ----------------------------------------------------------


def relay_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """A relay that binds only loopback and ships nowhere reachable."""
    return clean_env(
        **{
            **DUMMY_AWS_ENV,
            "SAMPLEFLOW_RELAY_TENANT_ID": "acme",
            "SAMPLEFLOW_RELAY_STATE_DIR": str(tmp_path / "state"),
            "SAMPLEFLOW_RELAY_LOG_FORMAT": "json",
            "SAMPLEFLOW_COLLECTOR_LISTEN_ADDRESSES": "127.0.0.1",
            "SAMPLEFLOW_COLLECTOR_PORTS": "0",
            "SAMPLEFLOW_FILTER_ENABLED": "false",
            "SAMPLEFLOW_KINESIS_REGION": "us-east-1",
            "SAMPLEFLOW_KINESIS_ENDPOINT_URL": "http://127.0.0.1:9",
            **settings,
        }
    )


def relay_error(result: subprocess.CompletedProcess[str]) -> str:
    """The relay's own error line (the JSON log lines aside)."""
    assert "Traceback" not in result.stderr, result.stderr
    plain = [
        line
        for line in result.stderr.splitlines()
        if line.startswith("sampleflow relay run: error: ")
    ]
    assert len(plain) == 1, result.stderr
    logged = [json.loads(x) for x in result.stderr.splitlines() if x.startswith("{")]
    assert [e["event"] for e in logged if e["level"] == "error"] == ["relay_failed"]
    return plain[0]


def test_relay_metrics_port_in_use_names_the_setting(
    tmp_path: Path, taken_port: int
) -> None:
    """relay run with metrics.port held by another socket exits 1 saying
    metrics.port=N on ADDRESS is in use."""
    result = sampleflow(
        "relay",
        "run",
        env=relay_env(tmp_path, SAMPLEFLOW_METRICS_PORT=str(taken_port)),
    )
    assert result.returncode == 1
    line = relay_error(result)
    assert f"metrics.port={taken_port} on 127.0.0.1 is in use" in line


def test_relay_spool_dir_that_is_a_file_names_the_setting(tmp_path: Path) -> None:
    """relay run with spool.dir naming a file exits 1 saying that it is a
    file, not a directory."""
    spool = tmp_path / "spool"
    spool.write_text("not a folder\n")
    result = sampleflow(
        "relay",
        "run",
        env=relay_env(
            tmp_path, SAMPLEFLOW_SPOOL_DIR=str(spool), SAMPLEFLOW_METRICS_PORT="0"
        ),
    )
    assert result.returncode == 1
    line = relay_error(result)
    assert f"spool.dir='{spool}': {spool} is a file, not a directory" in line


def test_relay_udp_port_in_use_names_the_settings(tmp_path: Path) -> None:
    """relay run with a collector port held by another UDP socket exits 1
    naming the port and the collector settings to change."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held:
        held.bind(("127.0.0.1", 0))
        port = int(held.getsockname()[1])
        result = sampleflow(
            "relay",
            "run",
            env=relay_env(
                tmp_path,
                SAMPLEFLOW_COLLECTOR_PORTS=str(port),
                SAMPLEFLOW_METRICS_ENABLED="false",
            ),
        )
    assert result.returncode == 1
    line = relay_error(result)
    assert f"port {port}" in line
    assert "collector.ports" in line


def engine_run(stream: str, checkpoint: Path, endpoint: str) -> str:
    """``engine run`` on ``stream`` at a Kinesis ``endpoint`` (us-east-1,
    dummy credentials); returns its one error line, after checking it
    exited 1."""
    result = sampleflow(
        "engine",
        "run",
        "--stream",
        stream,
        "--checkpoint",
        str(checkpoint),
        "--endpoint-url",
        endpoint,
        "--region",
        "us-east-1",
        env=clean_env(**DUMMY_AWS_ENV),
    )
    assert result.returncode == 1
    return engine_error(result)


def engine_error(result: subprocess.CompletedProcess[str]) -> str:
    """engine run's one error line; the rest is at most its JSON log line."""
    assert "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) <= 3, result.stderr
    (line,) = [
        x
        for x in result.stderr.splitlines()
        if x.startswith("sampleflow engine run: error: ")
    ]
    return line


def test_engine_run_with_an_unreachable_endpoint_is_one_line(tmp_path: Path) -> None:
    """engine run against a Kinesis endpoint nothing listens on exits 1
    naming the endpoint, before Spark starts (no Java trace)."""
    line = engine_run("s", tmp_path / "cp", "http://127.0.0.1:1")
    assert "cannot reach Kinesis at http://127.0.0.1:1" in line


def test_engine_run_on_a_missing_stream_names_it(
    tmp_path: Path, ministack: MiniStack
) -> None:
    """engine run on a stream the (real, local) Kinesis does not have exits
    1 saying so, before Spark starts."""
    line = engine_run("no-such-stream", tmp_path / "cp", ministack.endpoint_url)
    assert "'no-such-stream'" in line
    assert "ResourceNotFoundException" in line


# -- found by a fresh-user pass (session 3) ------------------------------------


def test_engine_status_with_a_url_that_is_not_one() -> None:
    """engine status --url notaurl is a usage error (2) naming the URL, not
    urllib's traceback; a timeout of 0 or less is refused by the parser."""
    line = error_line(2, "engine", "status", "--url", "notaurl")
    assert "'notaurl'" in line and "http://HOST:PORT" in line
    result = sampleflow("engine", "status", "--timeout", "-1")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "seconds > 0 are required, got '-1'" in result.stderr


def test_engine_status_of_a_server_that_is_not_an_engine(tmp_path: Path) -> None:
    """engine status against an HTTP server that answers 404 (not an engine)
    says the status code in one line, exit 1; a --url ending in /healthz is
    taken as the endpoint itself (one /healthz, not two)."""
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0),
        lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path)),
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        line = error_line(1, "engine", "status", "--url", url + "/healthz")
        assert f"{url}/healthz answered HTTP 404" in line
    finally:
        server.shutdown()
        server.server_close()


def test_relay_config_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    """A relay config file in Latin-1 (byte 0xe9 for 'é') is a configuration
    error naming the file and the byte, exit 2, for check-config and run;
    check-config takes the file as --config too."""
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'[relay]\ntenant_id = "caf\xe9"\n')
    for argv in (
        ("relay", "check-config", str(bad)),
        ("relay", "check-config", "--config", str(bad)),
        ("relay", "run", "--config", str(bad)),
    ):
        result = sampleflow(*argv)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        assert "not UTF-8 text (byte 0xe9 at offset 24)" in result.stderr
    good = tmp_path / "good.toml"
    good.write_text('# café, in UTF-8\n[relay]\ntenant_id = "cafe"\n', encoding="utf-8")
    result = sampleflow("relay", "check-config", "--config", str(good))
    assert result.returncode == 0, result.stderr
    assert "cafe" in result.stdout
