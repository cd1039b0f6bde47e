"""Who signed a receipt, and who countersigned it: certificate checks shared by booking and `verify`.

Checking a chain against the pool CA (parsing, an ECDSA verification per link) is done once per
process and chain; its validity period is rechecked at every use, against the time the work was
done, so a certificate that has expired stops being accepted (the cache keeps the period, never a
verdict).
"""

from __future__ import annotations

import datetime as dt
import threading
from collections import OrderedDict
from dataclasses import dataclass

from cryptography import x509

from coop.errors import Unauthorized
from coop.pool.ca import ROLE_COORDINATOR, ROLE_NODE, load_cert
from coop.pool.identity import Identity, verify_identity

CACHE_SIZE = 1024


@dataclass(frozen=True)
class _Checked:
    identity: Identity
    not_before: dt.datetime  # the latest start of every certificate in the chain and the CA
    not_after: dt.datetime  # the earliest end


_checked: OrderedDict[tuple[bytes, bytes, str], _Checked] = OrderedDict()
_lock = threading.Lock()


def _certified(ca_cert_pem: bytes, cert_pem: bytes, pool_id: str, at: dt.datetime) -> Identity:
    key = (ca_cert_pem, cert_pem, pool_id)
    with _lock:
        hit = _checked.get(key)
        if hit is not None:
            _checked.move_to_end(key)
    if hit is None:
        identity = verify_identity(ca_cert_pem, cert_pem, pool_id=pool_id, now=at)
        hit = _Checked(identity, *_validity(ca_cert_pem, cert_pem))
        with _lock:
            _checked[key] = hit
            while len(_checked) > CACHE_SIZE:
                _checked.popitem(last=False)
    if at < hit.not_before:
        raise Unauthorized(f"certificate is not valid before {hit.not_before:%Y-%m-%d %H:%M} UTC")
    if at > hit.not_after:
        raise Unauthorized(f"certificate expired on {hit.not_after:%Y-%m-%d %H:%M} UTC")
    return hit.identity


def _validity(ca_cert_pem: bytes, cert_pem: bytes) -> tuple[dt.datetime, dt.datetime]:
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as exc:
        raise Unauthorized("certificate is not PEM X.509") from exc
    certs = [*chain, load_cert(ca_cert_pem, "pool CA certificate")]
    return max(c.not_valid_before_utc for c in certs), min(c.not_valid_after_utc for c in certs)


def provider_of(ca_cert_pem: bytes, cert_pem: bytes, pool_id: str, at: dt.datetime) -> Identity:
    """The node (and its institution) that signed a receipt with this chain, valid at `at` (when the work ended)."""
    return _certified(ca_cert_pem, cert_pem, pool_id, at).require(ROLE_NODE)


def countersigner_of(ca_cert_pem: bytes, cert_pem: bytes, pool_id: str, at: dt.datetime) -> str:
    """The institution of the coordinator whose certificate countersigned a receipt, valid at `at`.

    The one place a countersigner's certificate is judged: booking trusts its own, `verify` every one.
    Only a pool coordinator's certificate (issued by the pool CA to that role) may countersign.
    """
    return _certified(ca_cert_pem, cert_pem, pool_id, at).require(ROLE_COORDINATOR).institution
