"""The routing table: models, the in-memory snapshot, its Redis store, and passwords."""

from .models import (
    DkimKey,
    Domain,
    DomainEntry,
    DomainLimits,
    DomainPolicy,
    InboundRelay,
    MtaStsPolicy,
    RelayHost,
    RoutingTable,
    SpamPolicy,
    TableGlobals,
    TlsPolicy,
    User,
    join_table,
    split_table,
)
from .passwords import PasswordVerifier, hash_password, is_argon2id_hash, verify_password_sync
from .snapshot import Mailbox, RoutingSnapshot
from .store import RoutingReader, RoutingStore, VersionConflict

__all__ = [
    "DkimKey",
    "Domain",
    "DomainEntry",
    "DomainLimits",
    "DomainPolicy",
    "InboundRelay",
    "Mailbox",
    "MtaStsPolicy",
    "PasswordVerifier",
    "RelayHost",
    "RoutingReader",
    "RoutingSnapshot",
    "RoutingStore",
    "RoutingTable",
    "SpamPolicy",
    "TableGlobals",
    "TlsPolicy",
    "User",
    "VersionConflict",
    "hash_password",
    "is_argon2id_hash",
    "join_table",
    "split_table",
    "verify_password_sync",
]
