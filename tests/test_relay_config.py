"""Relay settings: defaults, TOML file, environment, and errors that name
the key, the value, its source and what is allowed."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from edge_agent.cli import main as cli_main
from edge_agent.relay.config import ConfigError, load_settings, render_settings
from edge_agent.relay.pipeline import RelayPipeline


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(text)
    return path


def test_every_setting_has_a_default() -> None:
    """No file and no environment: the documented defaults."""
    s = load_settings(None, {})
    assert s.relay.tenant_id is None  # no default: relay run needs one
    assert s.relay.relay_id  # the host name, made valid
    assert s.relay.state_dir == Path("/var/lib/sampleflow")
    assert s.collector.listen_addresses == ("0.0.0.0",)
    assert s.collector.ports == (2055, 4739, 6343)
    assert s.collector.rcvbuf_bytes == 32 * 1024 * 1024
    assert s.decoder.default_sampling_rate == 0
    assert dict(s.decoder.sampling_overrides) == {}
    assert (s.aggregate.window_s, s.aggregate.lateness_s) == (10.0, 30.0)
    assert s.aggregate.max_keys == 100_000
    assert s.spool_dir == Path("/var/lib/sampleflow/spool")
    assert (s.spool.max_bytes, s.spool.full_policy) == (1 << 30, "drop_oldest")
    assert s.kinesis.stream_name == "sampleflow-flows"
    assert s.kinesis.region is None
    assert s.kinesis.partition_key == "exporter"
    assert (s.metrics.listen_address, s.metrics.port) == ("127.0.0.1", 9464)
    assert set(s.sources.values()) == {"default"}


def test_file_then_environment_override_defaults(tmp_path: Path) -> None:
    """The TOML file overrides defaults; the environment overrides the file;
    each value's source is recorded."""
    path = write(
        tmp_path,
        """
        [relay]
        tenant_id = "acme"
        relay_id = "edge-7"
        state_dir = "/srv/relay"
        [collector]
        ports = [2055, 9995]
        [decoder]
        default_sampling_rate = 512
        sampling_overrides = { "192.0.2.1" = 100, "2001:db8::2" = 1000 }
        [aggregate]
        window_s = 5
        [kinesis]
        stream_name = "flows"
        region = "eu-west-1"
        """,
    )
    env = {
        "SAMPLEFLOW_COLLECTOR_PORTS": "6343",
        "SAMPLEFLOW_AGGREGATE_MAX_KEYS": "5000",
        "SAMPLEFLOW_KINESIS_REGION": "",  # empty: back to boto3's chain
        "SAMPLEFLOW_ALLOW_NO_SHARED": "1",  # not a relay section: ignored
    }
    s = load_settings(path, env)
    assert (s.relay.tenant_id, s.relay.relay_id) == ("acme", "edge-7")
    assert s.spool_dir == Path("/srv/relay/spool")
    assert s.collector.ports == (6343,)
    assert dict(s.decoder.sampling_overrides) == {"192.0.2.1": 100, "2001:db8::2": 1000}
    assert s.aggregate.window_s == 5.0
    assert s.aggregate.max_keys == 5000
    assert s.kinesis.stream_name == "flows"
    assert s.kinesis.region is None
    assert s.sources["relay.tenant_id"] == f"file {path}"
    assert s.sources["collector.ports"] == "env SAMPLEFLOW_COLLECTOR_PORTS"
    assert s.sources["metrics.port"] == "default"


def test_environment_lists_tables_and_booleans() -> None:
    """Comma lists, key=value tables and true/false words from env strings."""
    s = load_settings(
        None,
        {
            "SAMPLEFLOW_COLLECTOR_LISTEN_ADDRESSES": "127.0.0.1, ::1",
            "SAMPLEFLOW_DECODER_SAMPLING_OVERRIDES": "192.0.2.1=100,192.0.2.2 = 7",
            "SAMPLEFLOW_METRICS_ENABLED": "off",
            "SAMPLEFLOW_KINESIS_USE_FIPS_ENDPOINT": "yes",
        },
    )
    assert s.collector.listen_addresses == ("127.0.0.1", "::1")
    assert dict(s.decoder.sampling_overrides) == {"192.0.2.1": 100, "192.0.2.2": 7}
    assert s.metrics.enabled is False
    assert s.kinesis.use_fips_endpoint is True


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SAMPLEFLOW_COLLECTOR_PORTS": "2055,70000"},
         "collector.ports=70000 (from env SAMPLEFLOW_COLLECTOR_PORTS): "
         "must be 0 to 65535"),
        ({"SAMPLEFLOW_COLLECTOR_LISTEN_ADDRESSES": "eth0"},
         "collector.listen_addresses='eth0'"),
        ({"SAMPLEFLOW_RELAY_TENANT_ID": "acme corp"}, "relay.tenant_id='acme corp'"),
        ({"SAMPLEFLOW_RELAY_LOG_LEVEL": "loud"},
         "must be one of debug, info, warning, error"),
        ({"SAMPLEFLOW_AGGREGATE_WINDOW_S": "0"}, "aggregate.window_s=0.0"),
        ({"SAMPLEFLOW_AGGREGATE_MAX_KEYS": "lots"},
         "aggregate.max_keys='lots' (from env SAMPLEFLOW_AGGREGATE_MAX_KEYS): "
         "must be an integer"),
        ({"SAMPLEFLOW_SPOOL_FULL_POLICY": "explode"},
         "must be one of drop_oldest, reject_new"),
        ({"SAMPLEFLOW_SPOOL_MAX_BYTES": "1000"}, "spool.max_bytes=1000"),
        # One full Kinesis record (1 MiB) plus its spool file's 76 bytes
        # (40 fixed, 36 of batch id) must fit: 65536 did not.
        ({"SAMPLEFLOW_SPOOL_MAX_BYTES": "65536"},
         "spool.max_bytes=65536 (from env SAMPLEFLOW_SPOOL_MAX_BYTES): "
         "must be >= 1048652"),
        ({"SAMPLEFLOW_COLLECTOR_PORTS": "23055,23055"},
         "collector.ports=23055 (from env SAMPLEFLOW_COLLECTOR_PORTS): "
         "is listed twice"),
        ({"SAMPLEFLOW_COLLECTOR_LISTEN_ADDRESSES": "127.0.0.1,127.0.0.1"},
         "collector.listen_addresses='127.0.0.1' (from env "
         "SAMPLEFLOW_COLLECTOR_LISTEN_ADDRESSES): is listed twice"),
        ({"SAMPLEFLOW_DECODER_SAMPLING_OVERRIDES": "192.0.2.1=0"},
         "decoder.sampling_overrides.192.0.2.1=0"),
        ({"SAMPLEFLOW_DECODER_SAMPLING_OVERRIDES": "router=5"},
         "must be an IPv4 or IPv6 address"),
        ({"SAMPLEFLOW_DECODER_SAMPLING_OVERRIDES": "192.0.2.1"}, "key=value pairs"),
        ({"SAMPLEFLOW_KINESIS_REGION": "mars"}, "kinesis.region='mars'"),
        ({"SAMPLEFLOW_KINESIS_PARTITION_KEY": "shard"},
         "must be one of exporter, relay, random"),
        ({"SAMPLEFLOW_KINESIS_REGION": "us-east-1",
          "SAMPLEFLOW_KINESIS_PARTITION": "aws-us-gov"},
         "kinesis.region='us-east-1'"),
        ({"SAMPLEFLOW_KINESIS_ENDPOINT_URL": "localhost:4566"},
         "kinesis.endpoint_url='localhost:4566'"),
        ({"SAMPLEFLOW_METRICS_ENABLED": "maybe"}, "must be true or false"),
        ({"SAMPLEFLOW_METRICS_PORT": "99999"}, "metrics.port=99999"),
        ({"SAMPLEFLOW_RELAY_TENANTID": "x"},
         "relay.tenantid='x' (from env SAMPLEFLOW_RELAY_TENANTID): unknown key; "
         "[relay] has tenant_id"),
    ],
)  # fmt: skip
def test_bad_environment_values_name_key_value_and_rule(
    env: dict[str, str], message: str
) -> None:
    """Each bad value stops loading with key, value, source and the rule."""
    with pytest.raises(ConfigError) as info:
        load_settings(None, env)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[collector]\nports = 2055\n", "collector.ports=2055"),
        ("[collector]\nports = ['2055']\n", "must be an integer"),
        ("[aggregate]\nwindow_s = '10'\n", "must be a number"),
        ("[relay]\nstate_dir = 5\n", "must be a path"),
        ("[decoder]\nsampling_overrides = 5\n", "must be a table"),
        ("[aggregator]\nwindow_s = 1\n", "unknown section; sections: relay"),
        ("relay = 1\n", "relay=1 (from file"),
        ("tenant_id = 'acme'\n", "a key outside any section: settings go under"),
        ("[kinesys]\na = 1\n", "kinesys='[kinesys]'"),
        ("[kinesis]\nstream = 'x'\n", "[kinesis] has stream_name"),
    ],
)
def test_bad_file_values_name_key_value_and_rule(
    tmp_path: Path, toml: str, message: str
) -> None:
    """Type and name errors in the file name the file as the source."""
    path = write(tmp_path, toml)
    with pytest.raises(ConfigError) as info:
        load_settings(path, {})
    assert message in str(info.value)
    assert f"file {path}" in str(info.value)


@pytest.mark.parametrize("where", ["file", "env"])
def test_credentials_are_refused_without_echoing_them(
    tmp_path: Path, where: str
) -> None:
    """An AWS secret in the settings is refused, pointing at the credential
    chain, and the secret itself is not repeated in the message."""
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    if where == "file":
        path: Path | None = write(
            tmp_path, f'[kinesis]\naws_secret_access_key = "{secret}"\n'
        )
        env = {}
    else:
        path = None
        env = {"SAMPLEFLOW_KINESIS_AWS_SECRET_ACCESS_KEY": secret}
    with pytest.raises(ConfigError, match="credential chain") as info:
        load_settings(path, env)
    assert secret not in str(info.value)


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    """A missing file and a TOML syntax error both name --config."""
    with pytest.raises(ConfigError, match=r"--config=.*cannot read"):
        load_settings(tmp_path / "absent.toml", {})
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path, "[relay\n"), {})


def test_component_configs_carry_the_settings(tmp_path: Path) -> None:
    """The collector, decoder and shipper configurations get the values."""
    s = load_settings(
        write(
            tmp_path,
            """
            [collector]
            listen_addresses = ["127.0.0.1"]
            ports = [9995]
            rcvbuf_bytes = 1048576
            [decoder]
            default_sampling_rate = 64
            sampling_overrides = { "192.0.2.1" = 100 }
            [kinesis]
            stream_name = "flows"
            endpoint_url = "http://127.0.0.1:4566"
            profile = "relay"
            """,
        ),
        {},
    )
    collector = s.collector.collector_config()
    assert (collector.bind_addresses, collector.ports) == (("127.0.0.1",), (9995,))
    assert collector.receive_buffer == 1048576
    decoder = s.decoder.decoder_config()
    assert decoder.default_sampling_rate == 64
    assert dict(decoder.sampling_overrides) == {"192.0.2.1": 100}
    shipper = s.kinesis.shipper_config()
    assert (shipper.stream_name, shipper.endpoint_url, shipper.profile) == (
        "flows",
        "http://127.0.0.1:4566",
        "relay",
    )


def test_check_config_prints_effective_settings_as_toml(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`relay check-config FILE` exits 0 and prints TOML that reads back to
    the same values, each line with its source."""
    path = write(tmp_path, '[relay]\ntenant_id = "acme"\nstate_dir = "/srv/r"\n')
    monkeypatch.setenv("SAMPLEFLOW_AGGREGATE_WINDOW_S", "2.5")
    assert cli_main(["relay", "check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert f'tenant_id = "acme"  # file {path}' in out
    assert "window_s = 2.5  # env SAMPLEFLOW_AGGREGATE_WINDOW_S" in out
    assert "# region is not set  # default" in out
    back = tomllib.loads(out)
    assert back["relay"]["tenant_id"] == "acme"
    assert back["spool"]["dir"] == "/srv/r/spool"
    assert back["aggregate"]["window_s"] == 2.5
    assert back["collector"]["ports"] == [2055, 4739, 6343]
    # and it loads as a config file giving the same settings
    again = write(tmp_path, out)
    assert (
        render_settings(load_settings(again, {}))
        .splitlines()[1]
        .startswith('tenant_id = "acme"')
    )


def test_check_config_fails_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad file: exit 2, the key and rule on stderr, nothing on stdout."""
    path = write(tmp_path, "[spool]\nfull_policy = 'panic'\n")
    assert cli_main(["relay", "check-config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "spool.full_policy='panic'" in captured.err
    assert "drop_oldest, reject_new" in captured.err


def test_relay_run_without_tenant_names_the_key(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """No tenant in file or environment: `relay run` exits 2 before binding
    anything, naming relay.tenant_id and both ways to set it; a
    pipeline refuses it too."""
    monkeypatch.delenv("SAMPLEFLOW_RELAY_TENANT_ID", raising=False)
    path = write(tmp_path, '[relay]\nrelay_id = "edge-1"\n')
    assert cli_main(["relay", "run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "relay.tenant_id=None" in err
    assert "SAMPLEFLOW_RELAY_TENANT_ID" in err and "[relay] tenant_id" in err
    with pytest.raises(ConfigError, match=r"relay\.tenant_id"):
        RelayPipeline(load_settings(path, {}))


def test_check_config_without_tenant_passes_with_a_note(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """check-config stays usable without a tenant: exit 0, the settings on
    stdout, a note naming relay.tenant_id on stderr."""
    monkeypatch.delenv("SAMPLEFLOW_RELAY_TENANT_ID", raising=False)
    assert cli_main(["relay", "check-config", str(write(tmp_path, ""))]) == 0
    captured = capsys.readouterr()
    assert "# tenant_id is not set  # default" in captured.out
    assert "note: relay.tenant_id=None" in captured.err


def test_check_config_notes_a_filter_model_that_is_not_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A [filter] model path with no file behind it passes (modelsync may
    bring one) with a note naming it; none when the filter is off."""
    missing = tmp_path / "nope.manifest.json"
    body = f'[relay]\ntenant_id = "acme"\n[filter]\nmodel = "{missing}"\n'
    assert cli_main(["relay", "check-config", str(write(tmp_path, body))]) == 0
    assert f"note: filter.model='{missing}' is not a file" in capsys.readouterr().err
    off = body + "enabled = false\n"
    assert cli_main(["relay", "check-config", str(write(tmp_path, off))]) == 0
    assert "filter.model" not in capsys.readouterr().err


def test_filter_settings(tmp_path: Path) -> None:
    """[filter]: private ranges plus the configured CIDRs; bad CIDRs,
    thresholds outside [0, 1] and no networks at all are refused."""
    s = load_settings(
        write(
            tmp_path,
            '[filter]\ninternal_networks = ["147.32.0.0/16"]\nthreshold = 0.9\n',
        ),
        {},
    )
    assert s.filter.networks == (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "fc00::/7",
        "147.32.0.0/16",
    )
    assert s.filter.threshold == 0.9
    assert s.filter_model is not None
    assert s.filter_model.name == "relay-ctu13s6-r100-w300.manifest.json"
    only = load_settings(
        None,
        {
            "SAMPLEFLOW_FILTER_PRIVATE_NETWORKS": "false",
            "SAMPLEFLOW_FILTER_INTERNAL_NETWORKS": "2001:db8::/32",
        },
    )
    assert only.filter.networks == ("2001:db8::/32",)
    for env, message in (
        ({"SAMPLEFLOW_FILTER_INTERNAL_NETWORKS": "10.0.0.1/8"}, "host bits set"),
        ({"SAMPLEFLOW_FILTER_THRESHOLD": "1.5"}, r"filter\.threshold=1\.5"),
        ({"SAMPLEFLOW_FILTER_PRIVATE_NETWORKS": "off"}, "list one or more CIDRs"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_settings(None, env)


def test_largest_batch_fits_the_smallest_spool(tmp_path: Path) -> None:
    """spool.max_bytes at its minimum (1 MiB + 76 bytes) takes a batch of a
    full 1 MiB Kinesis record with the longest batch id, from empty."""
    from edge_agent.spool import Spool, SpooledBatch, SpoolFullError  # noqa: PLC0415

    s = load_settings(None, {"SAMPLEFLOW_SPOOL_MAX_BYTES": str(1024 * 1024 + 76)})
    key = "k" * 16
    payload = b"x" * (1024 * 1024 - 16)
    bid = "00000000-0000-0000-0000-000000000000"
    with Spool(tmp_path / "spool", max_bytes=s.spool.max_bytes) as spool:
        batch = SpooledBatch(bid, key, payload, spool.next_seq())
        spool.append(batch)
        assert [b.payload for b in spool.pending()] == [batch.payload]
    # One byte less and the same batch no longer fits: the minimum is tight.
    with pytest.raises(ConfigError):
        load_settings(None, {"SAMPLEFLOW_SPOOL_MAX_BYTES": str(1024 * 1024 + 75)})
    with Spool(tmp_path / "small", max_bytes=1024 * 1024 + 75) as spool:
        seq = spool.next_seq()
        with pytest.raises(SpoolFullError):
            spool.append(SpooledBatch(bid, key, payload, seq))


def test_check_config_refuses_a_repeated_port(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """relay check-config exits 2 for ports = [23055, 23055], naming the key
    (relay run would fail later with "Address already in use")."""
    path = write(tmp_path, "[collector]\nports = [23055, 23055]\n")
    assert cli_main(["relay", "check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "collector.ports=23055" in err
    assert "is listed twice" in err
