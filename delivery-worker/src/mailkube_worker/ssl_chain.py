"""The certificate chain a TLS peer presented, as sent: the one private name the worker
relies on, in one place.

Python 3.13 has `ssl.SSLObject.get_unverified_chain()`; on 3.11 (the project's Python) the
method exists only on the C object behind it, `SSLObject._sslobj`. The TLS policies
(tlspolicy/) judge the chain after a handshake that verified nothing, so one session serves
enforce, testing and the TLS-RPT report alike. tests/unit/worker/test_ssl_chain.py fails on
a Python whose ssl module changes this.
"""

from __future__ import annotations

import _ssl
import ssl


def unverified_chain(ssl_object: ssl.SSLObject) -> list[bytes]:
    """The peer's chain (DER, leaf first), whatever the handshake verified; [] if none."""
    public = getattr(ssl_object, "get_unverified_chain", None)  # Python >= 3.13
    chain = public() if public is not None else ssl_object._sslobj.get_unverified_chain()  # type: ignore[attr-defined]
    return [certificate.public_bytes(_ssl.ENCODING_DER) for certificate in chain or []]
