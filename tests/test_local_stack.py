"""The local stack: real servers started, watched and stopped by the CLI.

``sampleflow local up/status/down`` run as separate processes, as a user
runs them.  After each stop the test looks for every process the stack
had (the parts' pids and every member of their process groups, read from
/proc while they ran) and requires that none is left.  Settings are unit
tested for precedence and error messages.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from cloud.local.settings import LocalSettings, SettingsError, load_settings
from cloud.local.stack import LocalStack, group_members, pick_free_port
from edge_agent.relay.metrics import MetricsServer
from tests.servers import free_port

#: The engine's own default status port (cloud/engine/defaults.py), which the
#: stack must leave alone.
ENGINE_DEFAULT_STATUS_PORT = 9466

PARTS = ("ministack", "store", "model-service", "engine", "relay")


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def write_config(path: Path, **overrides: object) -> dict[str, int]:
    """A [local] TOML file with free ports, each different from the others
    and from the overrides (the kernel may hand out a port an override
    holds); returns the ports."""
    used = {value for value in overrides.values() if isinstance(value, int)}

    def fresh(pick: Callable[[], int]) -> int:
        while (port := pick()) in used:
            pass
        used.add(port)
        return port

    ports = {
        "ministack_port": fresh(free_port),
        "store_port": fresh(free_port),
        "model_service_port": fresh(free_port),
        "relay_port": fresh(free_udp_port),
        "relay_metrics_port": fresh(free_port),
    }
    values: dict[str, object] = {**ports, **overrides}
    lines = ["[local]"]
    for key, value in values.items():
        lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")
    return ports


def cli(
    *args: str, cwd: Path, timeout: float = 240.0
) -> subprocess.CompletedProcess[str]:
    """Run ``sampleflow ARGS`` as its own process."""
    return subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def recorded_processes(state_dir: Path) -> dict[str, tuple[int, list[int]]]:
    """Per part: its pid, and every live process of its process group."""
    state = json.loads((state_dir / "stack.json").read_text())
    out = {}
    for part in state["parts"]:
        pid = int(part["pid"])
        out[part["name"]] = (pid, sorted({pid, *group_members(pid)}))
    return out


def wait_gone(pids: list[int], timeout_s: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    left = [p for p in pids if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = [p for p in left if alive(p)]
    return left


def start_up(config: Path, cwd: Path) -> subprocess.Popen[str]:
    """A foreground `sampleflow local up` (its output on a pipe)."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edge_agent.cli",
            "local",
            "up",
            "--config",
            str(config),
        ],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def read_until(proc: subprocess.Popen[str], prefix: str) -> list[str]:
    """Lines of ``proc`` up to the first starting with ``prefix``."""
    seen = []
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(prefix):
            return seen
    pytest.fail(f"no line starting {prefix!r}:\n" + "".join(seen))


def clean_up(up: subprocess.Popen[str], cwd: Path) -> None:
    """After a test, whatever happened: kill ``up`` if it still runs, close
    its pipe, and stop any part it left (`local down`)."""
    if up.poll() is None:
        up.kill()
        up.wait()
    if up.stdout is not None:
        up.stdout.close()
    cli("local", "down", cwd=cwd)


def hold_port(port: int) -> socket.socket | None:
    """A listening socket on 127.0.0.1:``port``, or None if it is taken."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        return None
    sock.listen()
    return sock


@pytest.mark.integration
@pytest.mark.slow
def test_up_status_down_leaves_no_process(tmp_path: Path) -> None:
    """`local up` brings every part up healthy on the configured ports and
    supervises, while 9466 (the engine's default status port) is held by
    someone else: the engine serves /healthz on a port the stack picked and
    shows; `local status` (another process) says so; `local down` (another
    process) stops them all and the supervising `up` ends with exit 0: no
    pid of any part or of its process group is left."""
    config = tmp_path / "local.toml"
    ports = write_config(config)
    # As a user's own engine would (if 9466 is taken already, the same holds).
    squatter = hold_port(ENGINE_DEFAULT_STATUS_PORT)
    up = start_up(config, tmp_path)
    state_dir = tmp_path / ".sampleflow"
    try:
        started = read_until(up, "supervising")
        processes = recorded_processes(state_dir)
        assert set(processes) == set(PARTS)
        # The engine's JVM is a child in the engine's group.
        assert len(processes["engine"][1]) >= 2
        status = cli("local", "status", "--config", str(config), cwd=tmp_path)
        assert status.returncode == 0, status.stdout + status.stderr
        lines = {line.split()[0]: line for line in status.stdout.splitlines()[1:6]}
        for part in PARTS:
            assert lines[part].endswith("healthy"), lines[part]
            assert lines[part].split()[1] == str(processes[part][0])
        assert f"udp {ports['relay_port']}" in lines["relay"]
        recorded = json.loads((state_dir / "stack.json").read_text())
        engine_port = recorded["settings"]["engine_status_port"]
        assert engine_port not in (0, ENGINE_DEFAULT_STATUS_PORT, *ports.values())
        assert lines["engine"].split()[2] == str(engine_port)
        assert any(f"starting engine (127.0.0.1:{engine_port})" in x for x in started)
        # The engine's own answer on that port.
        url = f"http://127.0.0.1:{engine_port}/healthz"
        with urllib.request.urlopen(url, timeout=5) as resp:
            assert resp.status == 200
            assert json.loads(resp.read())["query_running"] is True
        # Real answers on the configured loopback ports.
        url = f"http://127.0.0.1:{ports['relay_metrics_port']}/healthz"
        with urllib.request.urlopen(url, timeout=5) as resp:
            assert resp.status == 200
        url = f"http://127.0.0.1:{ports['ministack_port']}/_ministack/health"
        with urllib.request.urlopen(url, timeout=5) as resp:
            assert json.loads(resp.read())["services"]["kinesis"] == "available"
        # status needs no port flags: it reads the recorded settings.
        bare = cli("local", "status", cwd=tmp_path)
        assert bare.returncode == 0, bare.stdout + bare.stderr
        down = cli("local", "down", cwd=tmp_path)
        rest, _ = up.communicate(timeout=60)
    finally:
        clean_up(up, tmp_path)
        if squatter is not None:
            squatter.close()
    assert down.returncode == 0, down.stdout + down.stderr
    assert "stopped: relay, engine, model-service, store, ministack" in down.stdout
    assert up.returncode == 0, rest
    assert "stopped by `sampleflow local down`" in rest
    every_pid = [pid for _, pids in processes.values() for pid in pids]
    assert wait_gone(every_pid) == []
    assert not (state_dir / "stack.json").exists()
    after = cli("local", "status", cwd=tmp_path)
    assert after.returncode == 1
    assert "not running" in after.stdout


@pytest.mark.integration
def test_ctrl_c_while_starting_stops_everything(tmp_path: Path) -> None:
    """SIGINT (Ctrl-C) while `local up` waits for its parts stops every
    part started so far and exits 130, leaving no process behind."""
    config = tmp_path / "local.toml"
    write_config(config)
    up = start_up(config, tmp_path)
    try:
        read_until(up, "starting relay")
        deadline = time.monotonic() + 30
        processes = recorded_processes(tmp_path / ".sampleflow")
        while set(processes) != set(PARTS) and time.monotonic() < deadline:
            time.sleep(0.1)  # the relay's pid is recorded right after the line
            processes = recorded_processes(tmp_path / ".sampleflow")
        assert set(processes) == set(PARTS)
        up.send_signal(signal.SIGINT)
        rest, _ = up.communicate(timeout=120)
    finally:
        clean_up(up, tmp_path)
    assert up.returncode == 130, rest
    assert "interrupted while starting" in rest
    assert "stopping engine" in rest
    every_pid = [pid for _, pids in processes.values() for pid in pids]
    assert wait_gone(every_pid) == []


def test_port_in_use_names_port_and_setting(tmp_path: Path) -> None:
    """A taken TCP or UDP port stops `local up` before anything starts, with
    a message naming the port and how to change it."""
    config = tmp_path / "local.toml"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        write_config(config, store_port=port)
        result = cli("local", "up", "--config", str(config), cwd=tmp_path, timeout=60)
    assert result.returncode == 1
    assert f"127.0.0.1:{port} (store_port) is in use" in result.stderr
    assert "--store-port, SAMPLEFLOW_LOCAL_STORE_PORT" in result.stderr
    assert not (tmp_path / ".sampleflow" / "stack.json").exists()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        write_config(config)
        result = cli(
            "local",
            "up",
            "--config",
            str(config),
            "--relay-port",
            str(port),
            cwd=tmp_path,
            timeout=60,
        )
    assert result.returncode == 1
    assert f"UDP 127.0.0.1:{port} (relay_port) is in use" in result.stderr


def test_settings_precedence_and_errors(tmp_path: Path) -> None:
    """Flags win over the environment, which wins over the file, which wins
    over the default; errors name the key, value and source."""
    path = tmp_path / "local.toml"
    path.write_text('[local]\nstore_port = 30001\nrelay_port = 30002\nregion = "x"\n')
    env = {"SAMPLEFLOW_LOCAL_RELAY_PORT": "30003"}
    s = load_settings(path, {"region": "eu-west-1"}, env)
    assert (s.store_port, s.relay_port, s.region) == (30001, 30003, "eu-west-1")
    assert s.ministack_port == LocalSettings().ministack_port
    with pytest.raises(SettingsError) as err:
        load_settings(None, None, {"SAMPLEFLOW_LOCAL_STORE_PORT": "lots"})
    assert str(err.value) == (
        "store_port='lots' (from env SAMPLEFLOW_LOCAL_STORE_PORT): must be an integer"
    )
    with pytest.raises(SettingsError, match="is also ministack_port"):
        load_settings(None, {"store_port": 4566}, {})
    path.write_text("[local]\nstore_prot = 1\n")
    with pytest.raises(SettingsError, match=r"store_prot=1.*unknown key"):
        load_settings(path, None, {})
    with pytest.raises(SettingsError, match=r"relay_port=0.*1 to 65535"):
        load_settings(None, {"relay_port": 0}, {})
    assert LocalSettings().engine_status_port == 0
    with pytest.raises(SettingsError, match=r"engine_status_port=4566.*is also"):
        load_settings(None, {"engine_status_port": 4566}, {})
    with pytest.raises(SettingsError, match=r"engine_status_port=70000.*0 \(a free"):
        load_settings(None, {"engine_status_port": 70000}, {})


def test_engine_health_is_the_engines_healthz(tmp_path: Path) -> None:
    """The stack judges the engine by GET /healthz on its status port, served
    by the engine's own HTTP server class: 200 is healthy; a 503 with the
    query stopped, or with its trigger stuck, is unhealthy with the
    engine's error; no server is unhealthy, naming the URL."""
    answer: tuple[bool, dict[str, object]] = (True, {"query_running": True})
    server = MetricsServer(CollectorRegistry(), lambda: answer, port=0)
    server.start()
    try:
        settings = LocalSettings(state_dir=tmp_path, engine_status_port=server.port)
        stack = LocalStack(settings)
        [engine] = [p for p in stack.parts() if p.name == "engine"]
        assert [u.port for u in engine.ports] == [server.port]
        i = engine.argv.index("--status-port")
        assert engine.argv[i - 2 : i + 2] == [
            "--status-address",
            "127.0.0.1",
            "--status-port",
            str(server.port),
        ]
        assert engine.health() is None
        answer = (False, {"query_running": False, "error": "StreamingQuery died"})
        assert engine.health() == "/healthz answered 503: StreamingQuery died"
        answer = (False, {"query_running": True, "error": "trigger busy for 61 s"})
        assert engine.health() == "/healthz answered 503: trigger busy for 61 s"
    finally:
        server.stop()
    reason = engine.health()
    assert reason is not None
    assert reason.startswith(f"no answer from http://127.0.0.1:{server.port}/healthz")
    unset = LocalStack(LocalSettings(state_dir=tmp_path))
    [engine] = [p for p in unset.parts() if p.name == "engine"]
    assert engine.ports == ()
    assert engine.health() == "no engine_status_port recorded (stack.json predates it)"


def test_picked_port_is_free_and_below_the_ephemeral_range() -> None:
    """The port the stack picks for the engine can be bound and lies below
    the kernel's ephemeral range (read here from /proc), where outgoing
    connections and binds to port 0 do not land; ports to avoid are not
    picked."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(5):
        port = pick_free_port()
        assert 10_000 <= port < low
        held = hold_port(port)
        assert held is not None
        held.close()
    # Ports to avoid (the stack's other ports, not bound yet) are never
    # picked: with the whole range below the ephemeral one avoided, the
    # port comes from the kernel's own choice.
    avoid = frozenset(range(10_000, low))
    for _ in range(5):
        assert pick_free_port(avoid) not in avoid


def test_relay_config_is_valid_for_the_relay(tmp_path: Path) -> None:
    """The relay.toml the stack writes passes the relay's own check-config
    and binds the collector and metrics to loopback on the set ports."""
    settings = LocalSettings(state_dir=tmp_path / "state", relay_port=31000)
    stack = LocalStack(settings)
    path = tmp_path / "relay.toml"
    path.write_text(stack.relay_config())
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAMPLEFLOW_")}
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "relay", "check-config", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert 'listen_addresses = ["127.0.0.1"]' in result.stdout
    assert "ports = [31000]" in result.stdout
    assert 'endpoint_url = "http://127.0.0.1:4566"' in result.stdout


def test_engine_lateness_is_passed_and_scaled_for_replays(tmp_path: Path) -> None:
    """A set engine_lateness_s reaches the engine as --lateness; unset, the
    engine keeps its own default.  The demo's lateness for a stack it starts
    covers 3 wall seconds of replay (3 x speedup event seconds), never under
    the engine's 120 s: 60x -> 180 s, 600x -> 1800 s, 10x -> 120 s."""
    from cloud.local.demo import replay_lateness_s  # noqa: PLC0415

    assert [replay_lateness_s(x) for x in (10, 60, 600, 333.3)] == [
        120,
        180,
        1800,
        1000,
    ]
    [engine] = [
        p
        for p in LocalStack(
            LocalSettings(state_dir=tmp_path, engine_lateness_s=1800)
        ).parts()
        if p.name == "engine"
    ]
    i = engine.argv.index("--lateness")
    assert engine.argv[i + 1] == "1800"
    [engine] = [
        p
        for p in LocalStack(LocalSettings(state_dir=tmp_path)).parts()
        if p.name == "engine"
    ]
    assert "--lateness" not in engine.argv
    with pytest.raises(SettingsError, match=r"engine_lateness_s=-1.*>= 0"):
        load_settings(None, {"engine_lateness_s": -1}, {})
