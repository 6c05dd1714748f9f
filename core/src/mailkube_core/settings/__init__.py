"""Settings of every Mailkube process: pydantic models, read from MAILKUBE_* and a YAML file."""

from .loader import SettingsError, load_settings, load_settings_or_exit
from .models import (
    CommonSettings,
    DomainSpamDefaults,
    GatewaySettings,
    OperatorSettings,
    SmartHostSettings,
    WorkerSettings,
    split_host_port,
)
from .units import ByteSize, Duration, format_duration, parse_duration, parse_size

__all__ = [
    "ByteSize",
    "CommonSettings",
    "DomainSpamDefaults",
    "Duration",
    "GatewaySettings",
    "OperatorSettings",
    "SettingsError",
    "SmartHostSettings",
    "WorkerSettings",
    "format_duration",
    "load_settings",
    "load_settings_or_exit",
    "parse_duration",
    "parse_size",
    "split_host_port",
]
