"""Runtime settings of every Mailkube process (ARCHITECTURE.md "Settings").

Defaults are the seed design's. Every model forbids unknown fields, so a typo in the YAML file
stops the process at start instead of being silently ignored.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from .units import ByteSize, Duration

_HOSTNAME = re.compile(
    r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*\.?",
    re.I,
)


def _comma_list(value: Any) -> Any:
    """Environment variables carry lists as 'a,b,c'."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _host_port(value: str) -> str:
    """'host:port', '[v6]:port' or ':port' (every address). Normalised, port checked."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not an address: {value!r} (use host:port, [ipv6]:port or :port)")
    if host.startswith("[") and host.endswith("]"):
        ipaddress.IPv6Address(host[1:-1])
    elif host and not _HOSTNAME.fullmatch(host):
        raise ValueError(f"not an address: {value!r}")
    return f"{host}:{int(port)}"


def split_host_port(address: str) -> tuple[str | None, int]:
    """The inverse of `HostPort`: (host or None for every address, port); brackets removed."""
    host, _, port = address.rpartition(":")
    return (host.strip("[]") or None), int(port)


HostPort = Annotated[str, AfterValidator(_host_port)]
HostPortList = Annotated[list[HostPort], BeforeValidator(_comma_list)]
StrList = Annotated[list[str], BeforeValidator(_comma_list)]
NetworkList = Annotated[
    list[ipaddress.IPv4Network | ipaddress.IPv6Network], BeforeValidator(_comma_list)
]
DurationList = Annotated[list[Duration], BeforeValidator(_comma_list)]
PositiveInt = Annotated[int, Field(gt=0)]

#: the seed design's retry schedule
DEFAULT_RETRY_INTERVALS: tuple[timedelta, ...] = (
    timedelta(minutes=5), timedelta(minutes=15), timedelta(minutes=30), timedelta(hours=1),
    timedelta(hours=4), timedelta(hours=8), timedelta(hours=24),
)  # fmt: skip


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class CommonSettings(_Settings):
    """What every process needs: Redis, key layout, identity, logs and telemetry."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_cluster: bool = False
    redis_password: SecretStr | None = None
    redis_password_file: Path | None = None
    #: connections per process (per node on Cluster); callers beyond it wait for one
    redis_max_connections: Annotated[int, Field(ge=2, le=10000)] = 64
    key_prefix: str = "mailkube"
    queue_partitions: Annotated[int, Field(ge=1, le=1024)] = 1
    #: replicas that must hold a message before it counts as accepted (Redis WAIT); 0 = none
    queue_min_replicas: Annotated[int, Field(ge=0)] = 0
    hostname: str = Field(default_factory=socket.getfqdn)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    #: the /metrics, /healthz and /readyz HTTP server; empty string turns it off
    telemetry_listen: HostPort | Literal[""] = ":9100"
    routing_check_interval: Duration = timedelta(seconds=5)

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"must start with redis://, rediss:// or unix://, got {value!r}")
        return value

    @field_validator("key_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        # the prefix goes inside Redis Cluster hash tags, so braces would break slotting
        if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", value):
            raise ValueError("must be 1-64 characters of letters, digits, '_', '.', ':' or '-'")
        return value

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, value: str) -> str:
        if not _HOSTNAME.fullmatch(value):
            raise ValueError(f"not a hostname: {value!r}")
        return value.rstrip(".").lower()

    def redis_secret(self) -> str | None:
        """The Redis password: from redis_password_file (a mounted Secret) or redis_password."""
        if self.redis_password_file is not None:
            return self.redis_password_file.read_text().strip()
        return self.redis_password.get_secret_value() if self.redis_password else None


class GatewaySettings(CommonSettings):
    """The SMTP gateway (issue #3 adds what it needs beyond the seed)."""

    mx_listen: HostPortList = [":25"]
    submission_listen: HostPortList = [":587"]
    submissions_listen: HostPortList = [":465"]
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    require_tls: bool = False
    auth_on_mx: bool = False
    proxy_protocol_listeners: StrList = []
    trusted_proxies: NetworkList = []
    max_message_size: Annotated[ByteSize, Field(gt=0)] = 26214400
    max_recipients: PositiveInt = 100
    read_timeout: Duration = timedelta(seconds=60)
    write_timeout: Duration = timedelta(seconds=60)
    max_connections_per_ip: PositiveInt = 10
    max_messages_per_minute: PositiveInt = 30
    postmaster: str | None = None

    @field_validator("proxy_protocol_listeners")
    @classmethod
    def _listener_names(cls, value: list[str]) -> list[str]:
        unknown = set(value) - {"mx", "submission", "submissions"}
        if unknown:
            raise ValueError(
                f"unknown listener(s) {sorted(unknown)}; use mx, submission, submissions"
            )
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> GatewaySettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        return self


class SmartHostSettings(_Settings):
    """A relay for all remote mail (for clouds that block port 25)."""

    host: str
    port: Annotated[int, Field(gt=0, lt=65536)] = 587
    tls: Literal["starttls", "implicit", "none"] = "starttls"
    username: str | None = None
    password_file: Path | None = None


class WorkerSettings(CommonSettings):
    """The delivery worker (issue #5 adds what it needs beyond the seed)."""

    role: Literal["local", "remote", "all"] = "all"
    queue_workers: PositiveInt = 4
    mail_root: Path = Path("/var/mail")
    retry_intervals: DurationList = list(DEFAULT_RETRY_INTERVALS)
    retry_jitter: Annotated[float, Field(ge=0, le=1)] = 0.1
    max_retries: Annotated[int, Field(ge=0)] = 7
    bounce_after: Duration = timedelta(hours=48)
    delay_warning_after: Duration = timedelta(hours=4)
    visibility_timeout: Duration = timedelta(minutes=5)
    smart_host: SmartHostSettings | None = None
    telemetry_listen: HostPort | Literal[""] = ":9101"

    @field_validator("retry_intervals")
    @classmethod
    def _intervals(cls, value: list[timedelta]) -> list[timedelta]:
        if not value or any(v.total_seconds() <= 0 for v in value):
            raise ValueError("must be a non-empty list of positive durations")
        return value


class OperatorSettings(CommonSettings):
    """The Kubernetes operator (issue #6 adds what it needs)."""

    namespace: str = "default"
    cluster_wide: bool = False
    telemetry_listen: HostPort | Literal[""] = ":9102"


ALL_SETTINGS: tuple[type[CommonSettings], ...] = (GatewaySettings, WorkerSettings, OperatorSettings)
