"""The routing table: models, the in-memory snapshot, its Redis store, and passwords."""

from .models import (
    DkimKey,
    Domain,
    DomainLimits,
    DomainPolicy,
    RelayHost,
    RoutingTable,
    User,
)
from .passwords import PasswordVerifier, hash_password, is_argon2id_hash, verify_password_sync
from .snapshot import Mailbox, RoutingSnapshot
from .store import RoutingReader, RoutingStore, VersionConflict

__all__ = [
    "DkimKey",
    "Domain",
    "DomainLimits",
    "DomainPolicy",
    "Mailbox",
    "PasswordVerifier",
    "RelayHost",
    "RoutingReader",
    "RoutingSnapshot",
    "RoutingStore",
    "RoutingTable",
    "User",
    "VersionConflict",
    "hash_password",
    "is_argon2id_hash",
    "verify_password_sync",
]
