"""Settings (docs/architecture.md "Settings"): seed defaults, env over YAML, units, and errors that
name the field and its source on one line each, never echoing a password."""

from __future__ import annotations

from datetime import timedelta
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

import pytest

from mailkube_core.settings import (
    GatewaySettings,
    OperatorSettings,
    SettingsError,
    WorkerSettings,
    format_duration,
    load_settings,
    load_settings_or_exit,
    parse_duration,
    parse_size,
    split_host_port,
)

HOST = {"MAILKUBE_HOSTNAME": "mx.example.test"}
PASSWORD = "hunter2-do-not-print"


def write(tmp_path: Path, text: str, name: str = "mailkube.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(model: type, **kwargs: object) -> str:
    with pytest.raises(SettingsError) as info:
        load_settings(model, **kwargs)  # type: ignore[arg-type]
    return str(info.value)


# --- defaults -----------------------------------------------------------------------------


def test_gateway_defaults_are_the_seed_design() -> None:
    s = load_settings(GatewaySettings, environ=HOST)
    assert s.mx_listen == [":25"]
    assert s.submission_listen == [":587"]
    assert s.submissions_listen == [":465"]
    assert s.max_message_size == 26214400
    assert s.max_recipients == 100
    assert s.read_timeout == timedelta(seconds=60)
    assert s.write_timeout == timedelta(seconds=60)
    assert s.require_tls is False
    assert s.max_connections_per_ip == 10
    assert s.max_messages_per_minute == 30
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.key_prefix == "mailkube"
    assert s.hostname == "mx.example.test"


def test_worker_defaults_are_the_seed_design() -> None:
    s = load_settings(WorkerSettings, environ=HOST)
    assert s.queue_workers == 4
    assert s.retry_intervals == [
        timedelta(minutes=5),
        timedelta(minutes=15),
        timedelta(minutes=30),
        timedelta(hours=1),
        timedelta(hours=4),
        timedelta(hours=8),
        timedelta(hours=24),
    ]
    assert s.max_retries == 7
    assert s.bounce_after == timedelta(hours=48)
    assert s.smart_host is None


def test_operator_defaults_load_without_any_input() -> None:
    s = load_settings(OperatorSettings, environ={})
    assert s.namespace == "default"
    assert s.cluster_wide is False
    assert s.hostname  # from the machine, normalised


def test_each_component_has_its_own_telemetry_port() -> None:
    ports = {
        load_settings(model, environ=HOST).telemetry_listen
        for model in (GatewaySettings, WorkerSettings, OperatorSettings)
    }
    assert len(ports) == 3


# --- sources --------------------------------------------------------------------------------


def test_yaml_file_sets_values(tmp_path: Path) -> None:
    path = write(tmp_path, "max_recipients: 50\nread_timeout: 2m\nrequire_tls: true\n")
    s = load_settings(GatewaySettings, config_file=path, environ=HOST)
    assert s.max_recipients == 50
    assert s.read_timeout == timedelta(minutes=2)
    assert s.require_tls is True


def test_environment_overrides_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "max_recipients: 50\nkey_prefix: fromfile\n")
    s = load_settings(
        GatewaySettings, config_file=path, environ={**HOST, "MAILKUBE_MAX_RECIPIENTS": "7"}
    )
    assert s.max_recipients == 7
    assert s.key_prefix == "fromfile"


def test_config_file_named_by_mailkube_config(tmp_path: Path) -> None:
    path = write(tmp_path, "queue_workers: 9\n")
    s = load_settings(WorkerSettings, environ={**HOST, "MAILKUBE_CONFIG": str(path)})
    assert s.queue_workers == 9


def test_empty_yaml_file_means_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    assert load_settings(GatewaySettings, config_file=path, environ=HOST).max_recipients == 100


def test_shared_file_keys_of_other_components_are_accepted(tmp_path: Path) -> None:
    # one file for every component: the gateway ignores the worker's and operator's keys
    path = write(tmp_path, "queue_workers: 8\nnamespace: mail\nmax_recipients: 20\n")
    gateway = load_settings(GatewaySettings, config_file=path, environ=HOST)
    worker = load_settings(WorkerSettings, config_file=path, environ=HOST)
    operator = load_settings(OperatorSettings, config_file=path, environ=HOST)
    assert gateway.max_recipients == 20
    assert worker.queue_workers == 8
    assert operator.namespace == "mail"


def test_comma_lists_from_environment() -> None:
    s = load_settings(
        GatewaySettings,
        environ={
            **HOST,
            "MAILKUBE_MX_LISTEN": "[::1]:25, 0.0.0.0:2525",
            "MAILKUBE_PROXY_PROTOCOL_LISTENERS": "mx,submission",
            "MAILKUBE_TRUSTED_PROXIES": "10.0.0.0/8, fd00::/8",
        },
    )
    assert s.mx_listen == ["[::1]:25", "0.0.0.0:2525"]
    assert s.proxy_protocol_listeners == ["mx", "submission"]
    assert s.trusted_proxies == [IPv4Network("10.0.0.0/8"), IPv6Network("fd00::/8")]


def test_comma_list_of_durations() -> None:
    s = load_settings(WorkerSettings, environ={**HOST, "MAILKUBE_RETRY_INTERVALS": "1m,2m, 1h30m"})
    assert s.retry_intervals == [timedelta(minutes=1), timedelta(minutes=2), timedelta(minutes=90)]


def test_yaml_lists_are_lists(tmp_path: Path) -> None:
    path = write(tmp_path, "mx_listen: [':25', ':2525']\n")
    s = load_settings(GatewaySettings, config_file=path, environ=HOST)
    assert s.mx_listen == [":25", ":2525"]


def test_nested_smart_host_from_environment() -> None:
    s = load_settings(
        WorkerSettings,
        environ={
            **HOST,
            "MAILKUBE_SMART_HOST__HOST": "relay.example.test",
            "MAILKUBE_SMART_HOST__PORT": "465",
            "MAILKUBE_SMART_HOST__TLS": "implicit",
        },
    )
    assert s.smart_host is not None
    assert s.smart_host.host == "relay.example.test"
    assert s.smart_host.port == 465
    assert s.smart_host.tls == "implicit"


def test_unknown_mailkube_env_vars_are_ignored() -> None:
    # Kubernetes service links for a Service named mailkube-redis
    s = load_settings(
        GatewaySettings,
        environ={
            **HOST,
            "MAILKUBE_REDIS_PORT": "tcp://10.0.0.1:6379",
            "MAILKUBE_REDIS_PORT_6379_TCP": "tcp://10.0.0.1:6379",
            "MAILKUBE_REDIS_SERVICE_HOST": "10.0.0.1",
            "MAILKUBE_NOT_A_SETTING": "x",
            "OTHER_MAX_RECIPIENTS": "1",
        },
    )
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.max_recipients == 100


def test_env_for_another_component_is_ignored() -> None:
    s = load_settings(GatewaySettings, environ={**HOST, "MAILKUBE_QUEUE_WORKERS": "not-a-number"})
    assert not hasattr(s, "queue_workers")


def test_hostname_is_normalised() -> None:
    s = load_settings(GatewaySettings, environ={"MAILKUBE_HOSTNAME": "MX.Example.Test."})
    assert s.hostname == "mx.example.test"


def test_redis_password_is_hidden_in_repr() -> None:
    s = load_settings(GatewaySettings, environ={**HOST, "MAILKUBE_REDIS_PASSWORD": PASSWORD})
    assert PASSWORD not in repr(s)
    assert s.redis_secret() == PASSWORD


def test_redis_password_file_wins(tmp_path: Path) -> None:
    secret = write(tmp_path, PASSWORD + "\n", name="password")
    s = load_settings(
        GatewaySettings,
        environ={
            **HOST,
            "MAILKUBE_REDIS_PASSWORD": "other",
            "MAILKUBE_REDIS_PASSWORD_FILE": str(secret),
        },
    )
    assert s.redis_secret() == PASSWORD


def test_settings_are_frozen() -> None:
    s = load_settings(GatewaySettings, environ=HOST)
    with pytest.raises(ValueError, match="frozen"):
        s.max_recipients = 5  # type: ignore[misc]


def test_tls_pair_together() -> None:
    s = load_settings(
        GatewaySettings,
        environ={
            **HOST,
            "MAILKUBE_TLS_CERT_FILE": "/tls/tls.crt",
            "MAILKUBE_TLS_KEY_FILE": "/tls/tls.key",
        },
    )
    assert s.tls_cert_file == Path("/tls/tls.crt")
    assert s.tls_key_file == Path("/tls/tls.key")


@pytest.mark.parametrize(
    ("value", "expected"),
    [(":25", (None, 25)), ("0.0.0.0:2525", ("0.0.0.0", 2525)), ("[::1]:465", ("::1", 465))],
)
def test_split_host_port(value: str, expected: tuple[str | None, int]) -> None:
    s = load_settings(GatewaySettings, environ={**HOST, "MAILKUBE_MX_LISTEN": value})
    assert split_host_port(s.mx_listen[0]) == expected


def test_listener_port_zero_takes_a_free_port_only_with_one_process() -> None:
    s = load_settings(GatewaySettings, environ={**HOST, "MAILKUBE_MX_LISTEN": "127.0.0.1:0"})
    assert split_host_port(s.mx_listen[0]) == ("127.0.0.1", 0)
    with pytest.raises(SettingsError, match="mx_listen: port 0 needs processes 1"):
        load_settings(
            GatewaySettings,
            environ={**HOST, "MAILKUBE_MX_LISTEN": "127.0.0.1:0", "MAILKUBE_PROCESSES": "2"},
        )
    with pytest.raises(SettingsError, match="redis_sentinels"):
        load_settings(GatewaySettings, environ={**HOST, "MAILKUBE_REDIS_SENTINELS": "h:0"})


# --- units ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("250ms", timedelta(milliseconds=250)),
        ("90s", timedelta(seconds=90)),
        ("5m", timedelta(minutes=5)),
        ("48h", timedelta(hours=48)),
        ("2d", timedelta(days=2)),
        ("1w", timedelta(weeks=1)),
        ("1H", timedelta(hours=1)),
        ("1.5s", timedelta(seconds=1.5)),
        (" 90 ", timedelta(seconds=90)),
        ("90", timedelta(seconds=90)),
        ("0.25", timedelta(milliseconds=250)),
        (60, timedelta(seconds=60)),
        (1.5, timedelta(seconds=1.5)),
    ],
)
def test_parse_duration(text: object, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "5x", "m", "1h 30m", "h1", "1m30", "nan", "1..5s"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_parse_duration_passes_other_types_to_pydantic() -> None:
    assert parse_duration(True) is True
    assert parse_duration(None) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("25MiB", 26214400),
        ("26214400", 26214400),
        ("100KiB", 102400),
        ("1kb", 1000),
        ("1MB", 1000000),
        ("1GiB", 1024**3),
        ("1.5k", 1536),
        ("25 MiB", 26214400),
        ("10b", 10),
        (4096, 4096),
    ],
)
def test_parse_size(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "x", "-1", "1e3", "5TiB", "MiB"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_sizes_and_durations_through_settings() -> None:
    s = load_settings(
        GatewaySettings,
        environ={
            **HOST,
            "MAILKUBE_MAX_MESSAGE_SIZE": "25MiB",
            "MAILKUBE_READ_TIMEOUT": "250ms",
            "MAILKUBE_WRITE_TIMEOUT": "90",
        },
    )
    assert s.max_message_size == 26214400
    assert s.read_timeout == timedelta(milliseconds=250)
    assert s.write_timeout == timedelta(seconds=90)


@pytest.mark.parametrize(
    ("delta", "text"),
    [
        (timedelta(days=2), "2d"),
        (timedelta(hours=4), "4h"),
        (timedelta(minutes=90), "90m"),
        (timedelta(seconds=45), "45s"),
        (timedelta(0), "0s"),
    ],
)
def test_format_duration_round_trips(delta: timedelta, text: str) -> None:
    assert format_duration(delta) == text
    assert parse_duration(text) == delta


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "var", "value", "field"),
    [
        (GatewaySettings, "MAILKUBE_MAX_RECIPIENTS", "-1", "max_recipients"),
        (GatewaySettings, "MAILKUBE_MAX_RECIPIENTS", "many", "max_recipients"),
        (GatewaySettings, "MAILKUBE_READ_TIMEOUT", "5x", "read_timeout"),
        (GatewaySettings, "MAILKUBE_MAX_MESSAGE_SIZE", "0", "max_message_size"),
        (GatewaySettings, "MAILKUBE_MAX_MESSAGE_SIZE", "lots", "max_message_size"),
        (GatewaySettings, "MAILKUBE_MX_LISTEN", "nope", "mx_listen"),
        (GatewaySettings, "MAILKUBE_MX_LISTEN", ":70000", "mx_listen"),
        (GatewaySettings, "MAILKUBE_SUBMISSION_LISTEN", "bad host!:587", "submission_listen"),
        (GatewaySettings, "MAILKUBE_REDIS_URL", "http://redis:6379", "redis_url"),
        (GatewaySettings, "MAILKUBE_KEY_PREFIX", "mail{kube}", "key_prefix"),
        (GatewaySettings, "MAILKUBE_REQUIRE_TLS", "maybe", "require_tls"),
        (GatewaySettings, "MAILKUBE_LOG_LEVEL", "LOUD", "log_level"),
        (
            GatewaySettings,
            "MAILKUBE_PROXY_PROTOCOL_LISTENERS",
            "mx,smtp",
            "proxy_protocol_listeners",
        ),
        (GatewaySettings, "MAILKUBE_HOSTNAME", "not a host", "hostname"),
        (WorkerSettings, "MAILKUBE_RETRY_INTERVALS", "1m,0s", "retry_intervals"),
        (WorkerSettings, "MAILKUBE_RETRY_JITTER", "2", "retry_jitter"),
        (WorkerSettings, "MAILKUBE_ROLE", "both", "role"),
        (WorkerSettings, "MAILKUBE_QUEUE_WORKERS", "0", "queue_workers"),
        (WorkerSettings, "MAILKUBE_BOUNCE_AFTER", "two days", "bounce_after"),
        (OperatorSettings, "MAILKUBE_QUEUE_PARTITIONS", "0", "queue_partitions"),
    ],
)
def test_bad_env_value_names_field_and_variable(
    model: type, var: str, value: str, field: str
) -> None:
    message = error_of(model, environ={**HOST, var: value})
    lines = message.splitlines()
    assert len(lines) == 1, message
    assert field in lines[0]
    assert var in lines[0]


def test_bad_nested_env_value_names_the_nested_variable() -> None:
    message = error_of(
        WorkerSettings,
        environ={
            **HOST,
            "MAILKUBE_SMART_HOST__HOST": "relay",
            "MAILKUBE_SMART_HOST__PORT": "99999",
        },
    )
    assert message.splitlines() == [message]
    assert "smart_host.port" in message
    assert "MAILKUBE_SMART_HOST__PORT" in message


def test_several_problems_give_one_line_each() -> None:
    message = error_of(
        GatewaySettings,
        environ={
            **HOST,
            "MAILKUBE_MAX_RECIPIENTS": "-1",
            "MAILKUBE_READ_TIMEOUT": "soon",
            "MAILKUBE_REDIS_URL": "http://x",
        },
    )
    lines = message.splitlines()
    assert len(lines) == 3
    for field, var in [
        ("max_recipients", "MAILKUBE_MAX_RECIPIENTS"),
        ("read_timeout", "MAILKUBE_READ_TIMEOUT"),
        ("redis_url", "MAILKUBE_REDIS_URL"),
    ]:
        assert any(field in line and var in line for line in lines), message


def test_bad_yaml_value_names_field_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "max_recipients: -5\n")
    message = error_of(GatewaySettings, config_file=path, environ=HOST)
    assert message.splitlines() == [message]
    assert "max_recipients" in message
    assert str(path) in message


def test_unknown_yaml_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "max_recipents: 5\nmax_recipients: 5\n")
    message = error_of(GatewaySettings, config_file=path, environ=HOST)
    assert message.splitlines() == [message]
    assert "max_recipents" in message
    assert str(path) in message


def test_unknown_nested_yaml_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "smart_host:\n  host: relay\n  prot: 25\n")
    message = error_of(WorkerSettings, config_file=path, environ=HOST)
    assert "smart_host.prot" in message
    assert str(path) in message


def test_invalid_yaml_is_one_line_naming_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "max_recipients: [1,\n  2\nread_timeout: {\n")
    message = error_of(GatewaySettings, config_file=path, environ=HOST)
    assert message.splitlines() == [message]
    assert str(path) in message
    assert "YAML" in message


def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- max_recipients\n- 5\n")
    message = error_of(GatewaySettings, config_file=path, environ=HOST)
    assert str(path) in message
    assert "mapping" in message


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    message = error_of(GatewaySettings, config_file=path, environ=HOST)
    assert message.splitlines() == [message]
    assert str(path) in message


def test_cert_without_key() -> None:
    message = error_of(GatewaySettings, environ={**HOST, "MAILKUBE_TLS_CERT_FILE": "/tls/tls.crt"})
    assert message.splitlines() == [message]
    assert "tls_cert_file" in message
    assert "tls_key_file" in message


def test_missing_nested_required_field_names_it() -> None:
    message = error_of(WorkerSettings, environ={**HOST, "MAILKUBE_SMART_HOST__PORT": "25"})
    assert message.splitlines() == [message]
    assert "smart_host.host" in message


@pytest.mark.parametrize("value", ["[hunter2-do-not-print, x]", "{a: hunter2-do-not-print}"])
def test_bad_password_type_in_yaml_is_not_echoed(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, f"redis_password: {value}\n")
    message = error_of(GatewaySettings, config_file=path, environ=HOST)
    assert message.splitlines() == [message]
    assert "redis_password" in message
    assert str(path) in message
    assert PASSWORD not in message


def test_bad_password_number_in_yaml_is_not_echoed(tmp_path: Path) -> None:
    path = write(tmp_path, "redis_password: 918273645\n")
    message = error_of(GatewaySettings, config_file=path, environ=HOST)
    assert "redis_password" in message
    assert "918273645" not in message


def test_other_errors_do_not_echo_the_password() -> None:
    message = error_of(
        GatewaySettings,
        environ={**HOST, "MAILKUBE_REDIS_PASSWORD": PASSWORD, "MAILKUBE_MAX_RECIPIENTS": "x"},
    )
    assert PASSWORD not in message


def test_load_settings_or_exit_prints_prefixed_lines_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MAILKUBE_HOSTNAME", "mx.example.test")
    monkeypatch.setenv("MAILKUBE_MAX_RECIPIENTS", "-1")
    monkeypatch.setenv("MAILKUBE_READ_TIMEOUT", "soon")
    with pytest.raises(SystemExit) as info:
        load_settings_or_exit(GatewaySettings, "mailkube-gateway")
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 2
    assert all(line.startswith("mailkube-gateway: ") for line in lines)
    assert any("MAILKUBE_MAX_RECIPIENTS" in line for line in lines)
    assert any("MAILKUBE_READ_TIMEOUT" in line for line in lines)


def test_load_settings_or_exit_with_bad_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MAILKUBE_HOSTNAME", "mx.example.test")
    path = write(tmp_path, "queue_wrokers: 3\n")
    with pytest.raises(SystemExit) as info:
        load_settings_or_exit(WorkerSettings, "mailkube-worker", config_file=path)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("mailkube-worker: ")
    assert "queue_wrokers" in err


def test_load_settings_or_exit_returns_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILKUBE_HOSTNAME", "mx.example.test")
    monkeypatch.setenv("MAILKUBE_QUEUE_WORKERS", "12")
    assert load_settings_or_exit(WorkerSettings, "mailkube-worker").queue_workers == 12


# --- known bugs: these fail until core/src is fixed -------------------------------------------


def test_bad_network_in_list_is_one_line_naming_the_variable() -> None:
    # One line for one bad network, naming the real variable: not one line per member of the
    # IPv4|IPv6 union with pydantic's internal validator names.
    message = error_of(
        GatewaySettings, environ={**HOST, "MAILKUBE_TRUSTED_PROXIES": "10.0.0.0/8,bad"}
    )
    lines = message.splitlines()
    assert len(lines) == 1, message
    assert "trusted_proxies" in lines[0]
    assert "(from MAILKUBE_TRUSTED_PROXIES)" in lines[0], message


@pytest.mark.parametrize("value", ["inf", "1e400"])
def test_overflowing_duration_is_a_settings_error(value: str) -> None:
    # An OverflowError would escape pydantic as a traceback instead of a SettingsError line.
    message = error_of(GatewaySettings, environ={**HOST, "MAILKUBE_READ_TIMEOUT": value})
    assert "MAILKUBE_READ_TIMEOUT" in message


@pytest.mark.parametrize("value", ["-5", "-0.5"])
def test_negative_timeout_is_rejected(value: str) -> None:
    # A negative timeout would make every SMTP read time out at once.
    message = error_of(GatewaySettings, environ={**HOST, "MAILKUBE_READ_TIMEOUT": value})
    assert "MAILKUBE_READ_TIMEOUT" in message


def test_invalid_yaml_does_not_echo_the_password(tmp_path: Path) -> None:
    # The YAML parser's own message quotes the offending line, password included: not shown.
    path = write(tmp_path, f'redis_password: "{PASSWORD}\n')
    message = error_of(GatewaySettings, config_file=path, environ=HOST)
    assert str(path) in message
    assert PASSWORD not in message


def test_yaml_with_non_string_keys_is_a_settings_error(tmp_path: Path) -> None:
    # Unknown keys of mixed types (int and str) are reported, not a TypeError.
    path = write(tmp_path, "1: 2\nfoo: 3\n")
    message = error_of(GatewaySettings, config_file=path, environ=HOST)
    assert str(path) in message


def test_nested_env_merges_with_yaml(tmp_path: Path) -> None:
    # MAILKUBE_SMART_HOST__PORT overrides the file's port and keeps the file's host.
    path = write(tmp_path, "smart_host:\n  host: relay.example.test\n  port: 587\n")
    s = load_settings(
        WorkerSettings, config_file=path, environ={**HOST, "MAILKUBE_SMART_HOST__PORT": "2525"}
    )
    assert s.smart_host is not None
    assert (s.smart_host.host, s.smart_host.port) == ("relay.example.test", 2525)


# --- Redis replicas and Sentinel ------------------------------------------------------------


def test_enqueue_replicas_default_off_and_wait_derived_from_redis_timeout() -> None:
    settings = load_settings(GatewaySettings, environ=HOST)
    assert settings.enqueue_replicas == 0
    tuned = load_settings(
        GatewaySettings,
        environ={**HOST, "MAILKUBE_ENQUEUE_REPLICAS": "1", "MAILKUBE_REDIS_TIMEOUT": "4s"},
    )
    assert tuned.replica_ack_timeout() == timedelta(seconds=2)


def test_enqueue_replicas_timeout_must_be_shorter_than_redis_timeout() -> None:
    """The replicas' WAIT is one request: at redis_timeout its connection is dropped first."""
    message = error_of(
        GatewaySettings,
        environ={
            **HOST,
            "MAILKUBE_ENQUEUE_REPLICAS": "1",
            "MAILKUBE_ENQUEUE_REPLICAS_TIMEOUT": "5s",
            "MAILKUBE_REDIS_TIMEOUT": "5s",
        },
    )
    assert "enqueue_replicas_timeout must be shorter than redis_timeout" in message


def test_enqueue_replicas_timeout_must_be_shorter_than_enqueue_timeout() -> None:
    message = error_of(
        GatewaySettings,
        environ={
            **HOST,
            "MAILKUBE_ENQUEUE_REPLICAS": "2",
            "MAILKUBE_REDIS_TIMEOUT": "30s",
            "MAILKUBE_ENQUEUE_TIMEOUT": "10s",
        },
    )
    assert "enqueue_replicas_timeout must be shorter than enqueue_timeout" in message


def test_enqueue_replicas_is_refused_on_cluster() -> None:
    message = error_of(
        GatewaySettings,
        environ={**HOST, "MAILKUBE_ENQUEUE_REPLICAS": "1", "MAILKUBE_REDIS_CLUSTER": "true"},
    )
    assert "enqueue_replicas is not supported with redis_cluster" in message


def test_negative_enqueue_replicas_names_the_setting() -> None:
    message = error_of(GatewaySettings, environ={**HOST, "MAILKUBE_ENQUEUE_REPLICAS": "-1"})
    assert "invalid setting enqueue_replicas (from MAILKUBE_ENQUEUE_REPLICAS)" in message


def test_sentinels_from_environment() -> None:
    settings = load_settings(
        WorkerSettings,
        environ={
            **HOST,
            "MAILKUBE_REDIS_SENTINELS": "s1.example.test:26379, 10.0.0.2:26380,[::1]:26381",
            "MAILKUBE_REDIS_SENTINEL_MASTER": "mailkube",
            "MAILKUBE_REDIS_SENTINEL_PASSWORD": PASSWORD,
        },
    )
    assert settings.sentinel_addresses() == [
        ("s1.example.test", 26379),
        ("10.0.0.2", 26380),
        ("::1", 26381),
    ]
    assert settings.redis_sentinel_secret() == PASSWORD
    assert PASSWORD not in repr(settings)


def test_sentinel_password_file_wins(tmp_path: Path) -> None:
    secret = write(tmp_path, "from-file\n", "sentinel-password")
    settings = load_settings(
        OperatorSettings,
        environ={
            **HOST,
            "MAILKUBE_REDIS_SENTINELS": "s1:26379",
            "MAILKUBE_REDIS_SENTINEL_MASTER": "m",
            "MAILKUBE_REDIS_SENTINEL_PASSWORD": PASSWORD,
            "MAILKUBE_REDIS_SENTINEL_PASSWORD_FILE": str(secret),
        },
    )
    assert settings.redis_sentinel_secret() == "from-file"


def test_sentinels_need_a_master_name() -> None:
    message = error_of(OperatorSettings, environ={**HOST, "MAILKUBE_REDIS_SENTINELS": "s1:26379"})
    assert "redis_sentinel_master must name the primary" in message


def test_master_name_without_sentinels() -> None:
    message = error_of(
        OperatorSettings, environ={**HOST, "MAILKUBE_REDIS_SENTINEL_MASTER": "mailkube"}
    )
    assert "redis_sentinel_master is set but redis_sentinels is empty" in message


@pytest.mark.parametrize("address", [":26379", "s1", "s1:0", "bad host:26379"])
def test_bad_sentinel_address_names_the_setting(address: str) -> None:
    message = error_of(
        WorkerSettings,
        environ={
            **HOST,
            "MAILKUBE_REDIS_SENTINELS": address,
            "MAILKUBE_REDIS_SENTINEL_MASTER": "m",
        },
    )
    assert "invalid setting redis_sentinels" in message


def test_sentinels_exclude_cluster_and_unix_sockets() -> None:
    sentinels = {"MAILKUBE_REDIS_SENTINELS": "s1:26379", "MAILKUBE_REDIS_SENTINEL_MASTER": "m"}
    cluster = error_of(
        GatewaySettings, environ={**HOST, **sentinels, "MAILKUBE_REDIS_CLUSTER": "true"}
    )
    assert "redis_sentinels and redis_cluster exclude each other" in cluster
    unix = error_of(
        GatewaySettings,
        environ={**HOST, **sentinels, "MAILKUBE_REDIS_URL": "unix:///run/redis.sock"},
    )
    assert "redis_url must be redis:// or rediss:// with redis_sentinels" in unix


def test_a_service_raises_its_open_file_limit_to_the_hard_limit() -> None:
    import resource
    import subprocess
    import sys

    def low() -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    script = (
        "import resource\n"
        "from mailkube_core.service import raise_fd_limit\n"
        "before = resource.getrlimit(resource.RLIMIT_NOFILE)[0]\n"
        "now = raise_fd_limit()\n"
        "print(before, now, resource.getrlimit(resource.RLIMIT_NOFILE)[1])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], preexec_fn=low, capture_output=True, text=True,
        check=True, timeout=60,
    )  # fmt: skip
    before, now, hard = (int(v) for v in result.stdout.split())
    assert before == 256
    assert now == hard


def test_a_service_collects_young_garbage_less_often_and_freezes_what_it_started_with() -> None:
    import subprocess
    import sys

    script = (
        "import gc\n"
        "from mailkube_core.service import GC_YOUNG_THRESHOLD, tune_gc\n"
        "tune_gc()\n"
        "print(gc.get_threshold()[0] == GC_YOUNG_THRESHOLD, gc.get_freeze_count() > 1000)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.split() == ["True", "True"]
