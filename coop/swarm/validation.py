"""What a pool's DHT peers agree to hold: only records the pool signed, checked on store and on get.

hivemind lets any peer store any value under any key with any expiry, so without this an outsider
could store a plain value expiring in ten years under the directory key (the whole directory is
gone, and no node's re-announcement can replace it), or under the revocation key (revocations are
hidden). Every pool process installs a `PoolRecordValidator` in its DHT, which hivemind consults
when a peer asks it to store a record and when a peer answers its lookups; a refused answer counts
as no answer. A DHT key reaches the validator hashed (its DHTID), so each accepted kind of record
names the key it must be stored under, and the validator recomputes that key:

* a node's `NodeAnnouncement` under ``directory_key(pool, model)``, subkey its
  ``str(NodeKey(institution, node_id))`` (a member can name its node like another member's, but
  its records land under its own institution's subkey);
* that node's `Withdrawal` (the tombstone that hides it when it leaves), same key and subkey;
* the CA-signed `RevocationList` under ``revocations_key(pool)``, subkey its version.

Node records must be signed by a pool member, may live at most `MAX_RECORD_TTL_S`, and may not be
stored to expire later than they were signed to, so an old signed record cannot be replayed with a
long expiry. Revocations are not consulted here (the DHT runs in its own process and does not see
the live list); readers drop revoked members' records themselves (`AnnouncementVerifier`).
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.serializer import MSGPackSerializer

from coop.errors import Unauthorized
from coop.pool.membership import Membership
from coop.pool.revocation import RevocationList
from coop.swarm.announcement import (
    AnnouncementVerifier,
    NodeAnnouncement,
    SignedRecord,
    Withdrawal,
    announcement_payload,
    is_withdrawal,
    withdrawal_payload,
)
from coop.swarm.directory import MAX_RECORD_TTL_S, directory_key
from coop.swarm.node_key import key_of
from coop.swarm.revocations import REVOCATION_TTL_S, revocations_key, revocations_subkey

logger = logging.getLogger(__name__)

CLOCK_SKEW_S = 30.0
"""How far ahead of this peer's clock another member's clock may run."""

_EXPIRY_SLACK_S = 1e-6
"""Expirations cross msgpack and protobuf as float64, unchanged; this only absorbs rounding."""

_PLAIN_VALUE = MSGPackSerializer.dumps(None)  # hivemind's subkey of a value stored without a subkey


class SignatureCheck(Protocol):
    """Who may sign a node's records (today `AnnouncementVerifier`: a member certificate of the pool).

    Must pickle: the validator runs inside the DHT's own process.
    """

    def check_signed(self, record: SignedRecord, payload: bytes) -> str: ...


class PoolRecordValidator(RecordValidatorBase):
    """Accept a DHT record only if it is a signed record of this pool, filed where it belongs."""

    def __init__(self, pool_id: str, ca_cert_pem: bytes, signers: SignatureCheck) -> None:
        self.pool_id = pool_id
        self._ca_cert_pem = ca_cert_pem
        self._signers = signers
        self._revocations_key = DHTID.generate(revocations_key(pool_id)).to_bytes()

    def validate(self, record: DHTRecord) -> bool:
        try:
            self.check(record)
        except Exception as exc:  # whatever a peer sends, the answer is a refusal, never a crash
            logger.debug("refusing a DHT record under %s: %s", record.key.hex()[:16], exc)
            return False
        return True

    def check(self, record: DHTRecord) -> None:
        """Unauthorized (or InvalidInput for garbage) saying why record is refused."""
        if record.subkey == _PLAIN_VALUE:
            raise Unauthorized("a plain value without a subkey is never a pool record")
        subkey = MSGPackSerializer.loads(record.subkey)
        value = MSGPackSerializer.loads(record.value)
        if record.key == self._revocations_key:
            self._check_revocations(subkey, value, record.expiration_time)
        elif is_withdrawal(value):
            withdrawal = Withdrawal.from_wire(value)
            self._check_node_record(record, subkey, withdrawal, withdrawal.model_hash, withdrawal.expires_at)
            if withdrawal.expires_at - withdrawal.withdrawn_at > MAX_RECORD_TTL_S + CLOCK_SKEW_S:
                raise Unauthorized("withdrawal is signed to live longer than a record may")
            self._signers.check_signed(withdrawal, withdrawal_payload(withdrawal))
        else:
            ann = NodeAnnouncement.from_wire(value)
            self._check_node_record(record, subkey, ann, ann.model_hash, ann.expires_at)
            if ann.expires_at - ann.announced_at > MAX_RECORD_TTL_S:
                raise Unauthorized(f"announcement is signed to live longer than {MAX_RECORD_TTL_S:.0f} s")
            self._signers.check_signed(ann, announcement_payload(ann))

    def _check_node_record(
        self, record: DHTRecord, subkey: object, signed: SignedRecord, model_hash: str, expires_at: float
    ) -> None:
        if signed.pool_id != self.pool_id:
            raise Unauthorized(f"record is for pool {signed.pool_id!r}, not {self.pool_id!r}")
        if record.key != DHTID.generate(directory_key(self.pool_id, model_hash)).to_bytes():
            raise Unauthorized("record is not stored under its model's directory key")
        if subkey != str(key_of(signed)):
            raise Unauthorized(
                f"record of node {signed.node_id!r} of {signed.institution!r} is stored under another node's subkey"
            )
        if record.expiration_time > expires_at + _EXPIRY_SLACK_S:
            raise Unauthorized("record is stored to expire later than it was signed to")
        _check_not_too_far(record.expiration_time, MAX_RECORD_TTL_S)

    def _check_revocations(self, subkey: object, value: object, expiration_time: float) -> None:
        if not isinstance(value, bytes):
            raise Unauthorized("a revocation list is stored as bytes")
        revocations = RevocationList.from_bytes(value)
        if revocations.pool_id != self.pool_id:
            raise Unauthorized(f"revocation list is for pool {revocations.pool_id!r}, not {self.pool_id!r}")
        if subkey != revocations_subkey(revocations):
            raise Unauthorized("revocation list is stored under another version's subkey")
        _check_not_too_far(expiration_time, REVOCATION_TTL_S)
        revocations.verify(self._ca_cert_pem)


def _check_not_too_far(expiration_time: float, ttl_s: float) -> None:
    if expiration_time > time.time() + ttl_s + CLOCK_SKEW_S:
        raise Unauthorized(f"record is stored to expire more than {ttl_s:.0f} s from now")


def pool_record_validator(membership: Membership) -> PoolRecordValidator | None:
    """The validator every process of membership's pool installs in its DHT; development mode has none."""
    if membership.bundle is None:
        return None
    ca = membership.bundle.ca_cert_pem
    return PoolRecordValidator(membership.pool_id, ca, AnnouncementVerifier(ca, membership.pool_id))
