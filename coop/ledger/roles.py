"""PostgreSQL roles for coordinators: each its own login, with only what booking needs.

Several coordinators may book into one PostgreSQL ledger. Each gets its own role (so one can be cut
off without the others), and no role can rewrite history: a coordinator may read the ledger and
insert what booking writes (institutions, accounts, certificates, nodes, observations, receipts,
postings, audit events), and update nothing but a node's span and first/last seen and the tokens of
an observation (raised as a live session goes on). It cannot
update or delete a posting, receipt, grant or audit event, nor insert grants or credit floors: those
are the pool admin's, written with the owner's URL and signed with the pool CA key.
"""

from __future__ import annotations

import re
import secrets

from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from coop.errors import InvalidInput, LedgerError

_ROLE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
COORDINATOR_INSERTS = (
    "institutions",
    "accounts",
    "certificates",
    "nodes",
    "observations",
    "receipts",
    "postings",
    "audit_events",
)
COORDINATOR_UPDATES = {
    "nodes": ("start_block", "end_block", "first_seen", "last_seen"),  # Ledger._touch_nodes
    "observations": ("prefill_tokens", "decode_tokens", "seen_at"),  # Ledger.observe
}


def create_coordinator_role(engine: Engine, name: str) -> str | None:
    """Create role `name` with a new password and grant it a coordinator's privileges; returns its ledger URL.

    For a role that already exists, only the privileges are granted again (after a migration added a
    table, say) and None is returned: its password is unchanged.
    """
    if engine.dialect.name != "postgresql":
        raise InvalidInput(
            "coordinator roles exist only on PostgreSQL; a SQLite ledger is a file that only the pool admin's "
            "coordinator opens"
        )
    if not _ROLE_NAME.match(name):
        raise InvalidInput(f"role name {name!r}: lower-case letters, digits and _, starting with a letter or _")
    password = secrets.token_urlsafe(24)  # [A-Za-z0-9_-]: safe inside a quoted literal
    try:
        with engine.begin() as connection:
            exists = connection.execute(text("SELECT 1 FROM pg_roles WHERE rolname = :n"), {"n": name}).first()
            if exists is None:
                connection.execute(text(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'"))
            database = connection.execute(text("SELECT current_database()")).scalar_one()
            schema = connection.execute(text("SELECT current_schema()")).scalar_one()
            prep = engine.dialect.identifier_preparer
            connection.execute(text(f"GRANT CONNECT ON DATABASE {prep.quote(database)} TO {name}"))
            connection.execute(text(f"GRANT USAGE ON SCHEMA {prep.quote(schema)} TO {name}"))
            connection.execute(text(f"GRANT SELECT ON ALL TABLES IN SCHEMA {prep.quote(schema)} TO {name}"))
            connection.execute(text(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA {prep.quote(schema)} TO {name}"))
            connection.execute(text(f"GRANT INSERT ON {', '.join(COORDINATOR_INSERTS)} TO {name}"))
            for table, columns in COORDINATOR_UPDATES.items():
                connection.execute(text(f"GRANT UPDATE ({', '.join(columns)}) ON {table} TO {name}"))
    except SQLAlchemyError as exc:
        raise LedgerError(f"could not create coordinator role {name!r}: {exc}") from exc
    if exists is not None:
        return None
    url = make_url(engine.url).set(username=name, password=password)
    return url.render_as_string(hide_password=False)
