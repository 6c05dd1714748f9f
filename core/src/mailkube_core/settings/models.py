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


def _network(value: Any) -> Any:
    """A CIDR, parsed here so that a bad one is one error, not one per IP version."""
    if isinstance(value, str):
        try:
            return ipaddress.ip_network(value.strip())
        except ValueError:
            raise ValueError(f"not a network: {value!r} (use CIDR, e.g. 10.0.0.0/8)") from None
    return value


Network = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, BeforeValidator(_network)]
NetworkList = Annotated[list[Network], BeforeValidator(_comma_list)]
DurationList = Annotated[list[Duration], BeforeValidator(_comma_list)]
PositiveInt = Annotated[int, Field(gt=0)]

#: the seed design's retry schedule
DEFAULT_RETRY_INTERVALS: tuple[timedelta, ...] = (
    timedelta(minutes=5), timedelta(minutes=15), timedelta(minutes=30), timedelta(hours=1),
    timedelta(hours=4), timedelta(hours=8), timedelta(hours=24),
)  # fmt: skip


class _Settings(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, use_attribute_docstrings=True
    )


class CommonSettings(_Settings):
    """What every process needs: Redis, key layout, identity, logs and telemetry."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis to use: redis://, rediss:// (TLS) or unix://. Any node's URL on Cluster."""
    redis_cluster: bool = False
    """Speak the Redis Cluster protocol."""
    redis_password: SecretStr | None = None
    """Redis password (prefer redis_password_file)."""
    redis_password_file: Path | None = None
    """File holding the Redis password, e.g. a mounted Secret."""
    redis_max_connections: Annotated[int, Field(ge=2, le=10000)] = 64
    """Redis connections per process (per node on Cluster); callers beyond it wait."""
    key_prefix: str = "mailkube"
    """Prefix of every Redis key, so several installations can share one Redis."""
    queue_partitions: Annotated[int, Field(ge=1, le=1024)] = 1
    """Queue partitions (each its own Cluster hash tag). Raise it to spread the queue over
    Cluster nodes; only lower it once the queue is empty."""
    queue_min_replicas: Annotated[int, Field(ge=0)] = 0
    """Replicas that must hold a message before it is accepted (Redis WAIT); standalone
    Redis with replicas only."""
    hostname: str = Field(default_factory=socket.getfqdn)
    """This host's mail name: greeting, Received:, bounces. Default: the machine's FQDN."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Least severe log level written."""
    log_format: Literal["json", "text"] = "json"
    """json: one object per line, for log collectors; text: for people."""
    telemetry_listen: HostPort | Literal[""] = ":9100"
    """Address of the /metrics, /healthz and /readyz HTTP server; empty turns it off."""
    routing_check_interval: Duration = timedelta(seconds=5)
    """How often readers check the routing-table version, in case a notification was lost."""

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
    """MX listener addresses (host:port, [v6]:port, or :port for every address)."""
    submission_listen: HostPortList = [":587"]
    """Submission listener addresses: STARTTLS, then AUTH, required."""
    submissions_listen: HostPortList = [":465"]
    """Implicit-TLS submission listener addresses (RFC 8314)."""
    tls_cert_file: Path | None = None
    """PEM certificate chain; reloaded when the file changes."""
    tls_key_file: Path | None = None
    """PEM private key of tls_cert_file."""
    require_tls: bool = False
    """Refuse mail on the MX listener until the client has started TLS."""
    auth_on_mx: bool = False
    """Offer AUTH on the MX listener too (after STARTTLS)."""
    proxy_protocol_listeners: StrList = []
    """Listeners that expect the PROXY protocol header: mx, submission, submissions."""
    trusted_proxies: NetworkList = []
    """Networks allowed to send a PROXY protocol header (CIDRs)."""
    max_message_size: Annotated[ByteSize, Field(gt=0)] = 26214400
    """Largest message accepted, in bytes (SIZE); e.g. 26214400 or 25MiB."""
    max_recipients: PositiveInt = 100
    """Recipients per message; more get 452 4.5.3."""
    read_timeout: Duration = timedelta(seconds=60)
    """Longest wait for a client's next line."""
    write_timeout: Duration = timedelta(seconds=60)
    """Longest wait for a client to take a reply."""
    max_connections_per_ip: PositiveInt = 10
    """Concurrent connections from one client address."""
    max_messages_per_minute: PositiveInt = 30
    """Messages per minute from one sender (authenticated user or client address)."""
    postmaster: str | None = None
    """Mailbox that receives mail for postmaster (RFC 5321 §4.5.1)."""
    max_recipient_messages_per_minute: PositiveInt = 120
    """Messages per minute to one recipient address, across all gateways; more get 450."""
    max_connections: PositiveInt = 1000
    """Concurrent SMTP connections per gateway process; more get 421 at connect."""
    max_errors: PositiveInt = 10
    """Error replies one session may get before the gateway says 421 and hangs up."""
    max_header_size: Annotated[ByteSize, Field(gt=0)] = 262144
    """Largest header section accepted, in bytes."""
    max_received_headers: PositiveInt = 50
    """More Received: headers than this means a mail loop (554 5.4.6)."""
    auth_max_failures: PositiveInt = 5
    """Failed AUTH attempts per client address, and per user, before a lockout (454 4.7.0)."""
    auth_failure_window: Duration = timedelta(minutes=15)
    """Failures count for this long, and a lockout lasts this long."""
    enqueue_timeout: Duration = timedelta(seconds=10)
    """Longest wait for Redis to queue a message; after it the client gets 451 4.3.0."""
    tls_check_interval: Duration = timedelta(seconds=5)
    """How often the certificate and key files are checked for changes."""
    proxy_protocol_timeout: Duration = timedelta(seconds=5)
    """Longest wait for a trusted proxy's PROXY protocol header."""
    shutdown_grace: Duration = timedelta(seconds=25)
    """On SIGTERM, how long messages being received may finish (keep it under the pod's
    terminationGracePeriodSeconds); idle sessions get 421 at once."""
    processes: PositiveInt = 1
    """Gateway processes sharing the listeners with SO_REUSEPORT (one per core)."""
    inbound_auth_checks: bool = True
    """Check SPF, DKIM, ARC and DMARC on the MX listener and add Authentication-Results."""
    authserv_id: str | None = None
    """The authserv-id of Authentication-Results (RFC 8601); default: hostname."""
    dmarc_policy: Literal["enforce", "monitor"] = "enforce"
    """Domains without their own policy: enforce refuses DMARC p=reject failures (550 5.7.1)
    and files p=quarantine failures in Junk; monitor only records the result."""
    spf_fail: Literal["reject", "tag"] = "tag"
    """Domains without their own policy: an SPF fail is refused (550 5.7.23) or only recorded."""
    dns_temp_error: Literal["defer", "accept"] = "defer"
    """Domains without their own policy: a DNS temporary error during SPF/DKIM/DMARC answers
    451 4.7.x (defer) or accepts the message with the temperror recorded."""
    dns_nameservers: StrList = []
    """Resolvers for SPF, DKIM, DMARC (IP addresses); empty: those of /etc/resolv.conf."""
    dns_port: Annotated[int, Field(gt=0, lt=65536)] = 53
    """Port of dns_nameservers."""
    dns_timeout: Duration = timedelta(seconds=5)
    """Longest wait for one DNS lookup (all tries included)."""
    auth_check_threads: PositiveInt = 16
    """Threads for SPF, DKIM and ARC checks and DKIM signing (the libraries are blocking)."""

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
    """Relay host name."""
    port: Annotated[int, Field(gt=0, lt=65536)] = 587
    """Relay port."""
    tls: Literal["starttls", "implicit", "none"] = "starttls"
    """How to reach it: STARTTLS, implicit TLS, or plain (trusted networks only)."""
    username: str | None = None
    """AUTH user name, if the relay wants one."""
    password_file: Path | None = None
    """File holding the AUTH password, e.g. a mounted Secret."""


class WorkerSettings(CommonSettings):
    """The delivery worker (issue #5 adds what it needs beyond the seed)."""

    role: Literal["local", "remote", "all"] = "all"
    """local: mailbox delivery (mounts the mail volume); remote: SMTP out; all: both."""
    queue_workers: PositiveInt = 4
    """Deliveries in flight at once in this process."""
    mail_root: Path = Path("/var/mail")
    """Root of the maildirs: <mail_root>/<domain>/<localpart>/."""
    retry_intervals: DurationList = list(DEFAULT_RETRY_INTERVALS)
    """Waits before each retry after a temporary failure; the last one repeats."""
    retry_jitter: Annotated[float, Field(ge=0, le=1)] = 0.1
    """Each wait is stretched or shrunk at random by up to this fraction."""
    max_retries: Annotated[int, Field(ge=0)] = 7
    """Retries before the remaining recipients fail and bounce."""
    bounce_after: Duration = timedelta(hours=48)
    """Time in the queue after which the remaining recipients fail and bounce."""
    delay_warning_after: Duration = timedelta(hours=4)
    """Time in the queue after which a delay DSN (Action: delayed) is sent."""
    visibility_timeout: Duration = timedelta(minutes=5)
    """A claimed message not settled for this long goes to another worker (a dead pod's)."""
    smart_host: SmartHostSettings | None = None
    """Send all remote mail through this relay (for clouds that block port 25)."""
    telemetry_listen: HostPort | Literal[""] = ":9101"
    """Address of the /metrics, /healthz and /readyz HTTP server; empty turns it off."""
    queue_poll_interval: Annotated[Duration, Field(gt=timedelta(0))] = timedelta(seconds=1)
    """How long a claim waits for new entries, and how often deferred mail is checked."""
    shutdown_grace: Duration = timedelta(seconds=25)
    """On SIGTERM, how long deliveries in flight may finish (keep it under the pod's
    terminationGracePeriodSeconds); the rest are left for other workers."""
    smtp_port: Annotated[int, Field(gt=0, lt=65536)] = 25
    """Port of remote MX hosts (25; tests use another)."""
    smtp_connect_timeout: Duration = timedelta(seconds=30)
    """Longest wait for a TCP connection to a remote host."""
    smtp_tls_ca_file: Path | None = None
    """CA bundle that verifies remote hosts where TLS is required; default: the system's."""
    require_tls_domains: StrList = []
    """Destination domains that get mail only over verified TLS (others: STARTTLS when
    offered)."""
    mx_address_limit: PositiveInt = 5
    """Most MX host addresses tried per delivery attempt."""
    destination_concurrency: PositiveInt = 20
    """Concurrent connections per destination domain (or smart host), per worker process."""
    connection_cache_time: Duration = timedelta(seconds=5)
    """How long an idle SMTP connection is kept for the next message to the same place."""
    failed_host_ttl: Duration = timedelta(minutes=1)
    """How long a host that could not be reached is skipped when another one can be tried."""
    dns_nameservers: StrList = []
    """Resolvers for MX lookups (IP addresses); empty: those of /etc/resolv.conf."""
    dns_port: Annotated[int, Field(gt=0, lt=65536)] = 53
    """Port of dns_nameservers."""
    dns_timeout: Duration = timedelta(seconds=10)
    """Longest wait for one DNS lookup."""
    dsn_full_limit: ByteSize = 102400
    """A bounce for RET=FULL returns the whole message up to this size, else its headers."""
    events_max_length: PositiveInt = 100000
    """Entries kept (approximately) in the message.received event stream."""

    @field_validator("retry_intervals")
    @classmethod
    def _intervals(cls, value: list[timedelta]) -> list[timedelta]:
        if not value or any(v.total_seconds() <= 0 for v in value):
            raise ValueError("must be a non-empty list of positive durations")
        return value


class OperatorSettings(CommonSettings):
    """The Kubernetes operator (issue #6 adds what it needs)."""

    namespace: str = "default"
    """Namespace whose MailDomain and MailUser resources the operator serves."""
    cluster_wide: bool = False
    """Serve every namespace instead."""
    telemetry_listen: HostPort | Literal[""] = ":9102"
    """Address of the /metrics, /healthz and /readyz HTTP server; empty turns it off."""
    public_hostname: str | None = None
    """Public name of the gateway's address: the MX target in the DNS records each MailDomain's
    status lists. Default: hostname."""
    kube_api_server: str | None = None
    """URL of the Kubernetes API. Default: the in-cluster service account, else kubeconfig."""
    watch_timeout: Duration = timedelta(minutes=5)
    """Server-side timeout of each Kubernetes watch request; the watch then reconnects."""
    retry_delay: Annotated[Duration, Field(gt=timedelta(0))] = timedelta(seconds=30)
    """Wait before retrying a step that failed for a reason outside the operator (API errors,
    Redis down): no hot retry loops."""
    initial_publish_delay: Duration = timedelta(seconds=5)
    """At start, how long to wait for the first MailDomain or MailUser before publishing the
    routing table anyway (after checking that there are none)."""
    dns_check_interval: Duration = timedelta(0)
    """How often each MailDomain's DNS records are resolved and compared (DNSVerified);
    0 turns the DNS check off."""
    dns_nameservers: StrList = []
    """Resolvers for the DNS check (IP addresses); empty: those of /etc/resolv.conf."""
    dns_port: Annotated[int, Field(gt=0, lt=65536)] = 53
    """Port of dns_nameservers."""
    dns_timeout: Duration = timedelta(seconds=5)
    """Longest wait for one DNS lookup of the DNS check."""

    @field_validator("public_hostname")
    @classmethod
    def _public_hostname(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not _HOSTNAME.fullmatch(value):
            raise ValueError(f"not a hostname: {value!r}")
        return value.rstrip(".").lower()

    def mx_hostname(self) -> str:
        """The name MX records point at: public_hostname, else hostname."""
        return self.public_hostname or self.hostname


ALL_SETTINGS: tuple[type[CommonSettings], ...] = (GatewaySettings, WorkerSettings, OperatorSettings)
