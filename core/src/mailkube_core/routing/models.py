"""The routing table (ARCHITECTURE.md "Routing table"): domains, users, DKIM keys, policies.

The operator and `mailkube routing apply` write it; the gateway and workers read it. Addresses
and domain names are stored normalised (see `addresses`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    model_validator,
)

from ..addresses import normalize_address, normalize_domain, split_address

DomainName = Annotated[str, AfterValidator(normalize_domain)]
Address = Annotated[str, AfterValidator(normalize_address)]
#: stored in Redis in clear (Redis holds the keys anyway); shown as ********** by repr/str
Secret = Annotated[
    SecretStr,
    PlainSerializer(lambda value: value.get_secret_value(), return_type=str, when_used="json"),
]
Selector = Annotated[str, Field(pattern=r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DkimKey(_Model):
    selector: Selector
    algorithm: Literal["rsa-sha256", "ed25519-sha256"]
    #: PEM for RSA; for Ed25519 the base64 of the 32-byte private seed, as dkimpy takes it
    private_key: Secret
    #: False for a retired key still published in DNS during a rotation; it does not sign
    signing: bool = True


class DomainPolicy(_Model):
    """Inbound checks for mail to the domain; None: the gateway's setting of the same name."""

    #: enforce: DMARC p=reject fails with 550 and p=quarantine goes to .Junk; monitor: tag only
    dmarc: Literal["enforce", "monitor"] | None = None
    #: an SPF fail: refuse (550 5.7.23) or accept with the result in Authentication-Results
    spf_fail: Literal["reject", "tag"] | None = None
    #: a DNS temporary error during SPF/DKIM/DMARC: answer 451 (defer) or accept and tag
    dns_temp_error: Literal["defer", "accept"] | None = None
    #: outbound: deliver only over TLS for this sender domain
    require_tls_outbound: bool = False


class DomainLimits(_Model):
    max_message_size: Annotated[int, Field(gt=0)] | None = None
    max_messages_per_minute: Annotated[int, Field(gt=0)] | None = None


class RelayHost(_Model):
    """Outbound smart host for mail from this domain."""

    host: str
    port: Annotated[int, Field(gt=0, lt=65536)] = 587
    tls: Literal["starttls", "implicit", "none"] = "starttls"
    username: str | None = None
    password: Secret | None = None


class Domain(_Model):
    name: DomainName
    dkim: list[DkimKey] = []
    #: where mail to unknown local parts of this domain goes; None rejects them (550 5.1.1)
    catch_all: Address | None = None
    policy: DomainPolicy = DomainPolicy()
    limits: DomainLimits = DomainLimits()
    relay: RelayHost | None = None

    def signing_keys(self) -> list[DkimKey]:
        return [key for key in self.dkim if key.signing]


class User(_Model):
    address: Address
    #: argon2id (PHC string); None: the user cannot log in (e.g. its Secret is missing)
    password_hash: str | None = None
    #: mailbox quota in bytes; None: unlimited
    quota: Annotated[int, Field(ge=0)] | None = None
    aliases: list[Address] = []
    forward_to: list[Address] = []
    #: with forward_to, also deliver to the local mailbox
    keep_copy: bool = False
    #: extra MAIL FROM addresses this user may submit with
    send_as: list[Address] = []
    suspended: bool = False

    @property
    def domain(self) -> str:
        return split_address(self.address)[1]


class RoutingTable(_Model):
    domains: list[Domain] = []
    users: list[User] = []

    @model_validator(mode="after")
    def _consistent(self) -> RoutingTable:
        names = [d.name for d in self.domains]
        if len(names) != len(set(names)):
            raise ValueError(
                f"domain listed twice: {sorted({n for n in names if names.count(n) > 1})}"
            )
        owners: dict[str, str] = {}
        for user in self.users:
            if user.domain not in names:
                raise ValueError(f"user {user.address}: domain {user.domain} is not in the table")
            for address in (user.address, *user.aliases):
                if split_address(address)[1] not in names:
                    raise ValueError(f"alias {address} of {user.address} is not in a local domain")
                if address in owners:
                    raise ValueError(
                        f"address {address} belongs to both {owners[address]} and {user.address}"
                    )
                owners[address] = user.address
        return self
