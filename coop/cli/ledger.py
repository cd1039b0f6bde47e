"""`coop ledger ...`: balances, receipts, export, verify, grants and credit floors, the ledger's URL and roles.

Run by the pool admin, in the pool directory. The ledger is found from `--ledger-url` (or
COOP_LEDGER_URL), else the pool directory's 0600 `ledger.url`, else `ledger.db` in the pool
directory: the same rule the coordinator follows with `--pool-dir`. Grants and floors are signed
with the pool CA key; `verify` believes only the pool directory's CA, API keys and revocations.
"""

from __future__ import annotations

import csv
import datetime as dt
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from coop.cli.console import console, err_console, plain, quoted
from coop.cli.options import PoolOption
from coop.errors import InvalidInput

if TYPE_CHECKING:
    from coop.ledger.store import Ledger

ledger_app = typer.Typer(no_args_is_help=True, help="The pool's credit ledger: who gave, who took.")

UrlOption = Annotated[
    str | None,
    typer.Option(
        "--ledger-url",
        envvar="COOP_LEDGER_URL",
        help="database URL (default: <pool>/ledger.url, else <pool>/ledger.db)",
    ),
]

ADMIN_ACTOR = "admin (cli)"


def _open(pool: Path, url: str | None) -> Ledger:
    from coop.ledger.database import ledger_location
    from coop.ledger.store import Ledger
    from coop.pool.registry import PoolInfo

    PoolInfo.load(pool)  # a clear error if this is no pool directory
    return Ledger.open(ledger_location(url, pool))


def _credits(flops: int) -> str:
    """Exact to the micro-credit at any size (a float would round past 2**53)."""
    from decimal import Decimal

    from coop.ledger.models import FLOPS_PER_CREDIT

    return f"{Decimal(flops) / FLOPS_PER_CREDIT:,.6f}"


def _since(text: str | None) -> dt.datetime | None:
    """ISO date/time (UTC unless it says otherwise) or a duration back from now: 30m, 12h, 7d."""
    if text is None:
        return None
    units = {"m": 60, "h": 3600, "d": 86400}
    if text[-1:] in units and text[:-1].isdigit():
        return dt.datetime.now(dt.UTC) - dt.timedelta(seconds=int(text[:-1]) * units[text[-1]])
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise InvalidInput(f"--since {text!r}: use an ISO date (2026-11-01) or a duration (30m, 12h, 7d)") from exc
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


@ledger_app.command("balances")
def balances(pool: PoolOption, ledger_url: UrlOption = None) -> None:
    """Every institution's balance, contribution, usage and grants, in credits (1 credit = 10^12 FLOPs)."""
    ledger = _open(pool, ledger_url)
    console.print(balances_table(ledger))


def balances_table(ledger: Ledger) -> Table:
    """Balances as a table (also printed by `coop demo`)."""
    table = Table(title="Balances (credits; 1 credit = 10^12 FLOPs)")
    for column in ("institution", "balance", "contributed", "used", "granted", "floor"):
        table.add_column(column, justify="left" if column == "institution" else "right")
    for b in ledger.balances():
        floor = "-" if b.credit_floor_flops is None else _credits(b.credit_floor_flops)
        table.add_row(
            plain(b.institution),
            _credits(b.balance_flops),
            _credits(b.contributed_flops),
            _credits(b.used_flops),
            _credits(b.granted_flops),
            floor,
        )
    table.add_row("(pool account)", _credits(ledger.pool_balance_flops()), "", "", "", "")
    return table


@ledger_app.command("receipts")
def receipts(
    pool: PoolOption,
    ledger_url: UrlOption = None,
    institution: Annotated[str | None, typer.Option("--institution", help="as provider or consumer")] = None,
    since: Annotated[str | None, typer.Option("--since", help="ISO date/time or 30m / 12h / 7d")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1)] = 50,
) -> None:
    """Booked receipts, newest first."""
    ledger = _open(pool, ledger_url)
    rows = ledger.receipts(institution=institution, since=_since(since), limit=limit)
    table = Table(title=f"{len(rows)} receipts")
    for column in ("ended (UTC)", "receipt", "node", "provider", "consumer", "blocks", "tokens", "credits"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            f"{r.ended_at:%Y-%m-%d %H:%M:%S}",
            r.receipt_id[:12],
            plain(r.node_id),
            plain(r.provider),
            plain(r.consumer),
            f"{r.start_block}:{r.end_block}",
            f"{r.prefill_tokens}+{r.decode_tokens}",
            _credits(r.flops),
        )
    console.print(table)


EXPORT_COLUMNS = (
    "receipt_id",
    "booked_at",
    "started_at",
    "ended_at",
    "session_id",
    "node_id",
    "provider",
    "consumer",
    "model_hash",
    "start_block",
    "end_block",
    "prefill_tokens",
    "decode_tokens",
    "flops",
)


@ledger_app.command("export")
def export(
    pool: PoolOption,
    ledger_url: UrlOption = None,
    as_csv: Annotated[bool, typer.Option("--csv", help="CSV (the only format so far)")] = True,
    out: Annotated[Path | None, typer.Option("--out", help="file to write (default: stdout)")] = None,
    since: Annotated[str | None, typer.Option("--since")] = None,
) -> None:
    """Every booked receipt as CSV, oldest first: for spreadsheets and audits."""
    ledger = _open(pool, ledger_url)
    rows = list(reversed(ledger.receipts(since=_since(since))))
    stream = out.open("w", newline="") if out else sys.stdout
    try:
        writer = csv.writer(stream)
        writer.writerow(EXPORT_COLUMNS)
        for r in rows:
            writer.writerow([getattr(r, column) for column in EXPORT_COLUMNS])
    finally:
        if out:
            stream.close()
    if out:
        err_console.print(f"wrote {len(rows)} receipts to {plain(out)}")


@ledger_app.command("verify")
def verify(
    pool: PoolOption,
    ledger_url: UrlOption = None,
    models: Annotated[
        list[Path] | None,
        typer.Option("--model", help="a prepared model's directory: its receipts' FLOPs are recomputed (repeatable)"),
    ] = None,
) -> None:
    """Recompute every balance from postings; check every signature, every receipt's FLOPs against its
    model's manifest, and that postings sum to zero."""
    from coop.ledger.verify import PoolTrust, verify_ledger
    from coop.model.manifest import Manifest

    manifests = [Manifest.load(model_dir) for model_dir in models or ()]
    trust = PoolTrust.load(pool, {manifest.content_hash: manifest for manifest in manifests})
    ledger = _open(pool, ledger_url)
    report = verify_ledger(ledger, trust)
    for model_hash, count in sorted(report.unchecked_models.items()):
        err_console.print(
            f"[yellow]unchecked:[/] the FLOPs of {count} receipts of model {plain(model_hash)}; "
            "pass its directory with --model to recompute them"
        )
    summary = (
        f"{report.receipts} receipts, {report.grants} grants, {report.floors} credit floors, {report.postings} postings"
    )
    if report.ok:
        console.print(
            f"[green]ledger OK[/]: {summary}; every signature checks out, every consumer owns the API key it "
            "was charged through, and postings sum to zero"
        )
        return
    for problem in report.problems:
        err_console.print(f"[red]problem:[/] {plain(problem)}")
    err_console.print(f"[red]ledger NOT OK[/]: {len(report.problems)} problems in {summary}")
    raise typer.Exit(code=1)


@ledger_app.command("grant")
def grant(
    institution: Annotated[str, typer.Argument(help="the member institution to credit")],
    amount: Annotated[str, typer.Argument(help="credits, exact in decimal: 100, 0.5, 1e9 (take back: -- -5)")],
    pool: PoolOption,
    reason: Annotated[str, typer.Option("--reason", help="recorded in the audit log")],
    ledger_url: UrlOption = None,
) -> None:
    """Move credits from the pool account to an institution, signed with the pool CA key."""
    from coop.ledger.grants import AdminSigner

    signer = AdminSigner.load(pool)
    ledger = _open(pool, ledger_url)
    row = ledger.grant(institution, amount, reason=reason, actor=ADMIN_ACTOR, signer=signer)
    console.print(f"granted {_credits(row.flops)} credits to {quoted(institution)} (grant {row.grant_id})")


@ledger_app.command("floor")
def floor(
    institution: Annotated[str, typer.Argument(help="the member institution")],
    pool: PoolOption,
    credits: Annotated[
        str | None, typer.Option("--credits", help="the lowest balance it may spend down to (omit: no floor)")
    ] = None,
    ledger_url: UrlOption = None,
) -> None:
    """Set (or with no --credits, remove) an institution's credit floor: below it, its requests get 402."""
    from coop.ledger.grants import AdminSigner
    from coop.ledger.models import credits_to_flops

    signer = AdminSigner.load(pool)
    ledger = _open(pool, ledger_url)
    ledger.set_credit_floor(institution, credits, actor=ADMIN_ACTOR, signer=signer)
    what = "no floor" if credits is None else f"a floor of {_credits(credits_to_flops(credits))} credits"
    console.print(f"{quoted(institution)} now has {what}")


@ledger_app.command("set-url")
def set_url(
    url: Annotated[str, typer.Argument(help="e.g. postgresql+psycopg://coop:PASSWORD@db/coop")],
    pool: PoolOption,
) -> None:
    """Keep the ledger's database URL in <pool>/ledger.url (0600), where the coordinator and these commands find it.

    Never in pool.toml or a member bundle: whoever has the URL can write to the books.
    """
    from coop.ledger.database import safe_url, write_ledger_url
    from coop.pool.registry import PoolInfo

    PoolInfo.load(pool)
    path = write_ledger_url(pool, url, replace=True)
    console.print(f"the ledger of this pool is {plain(safe_url(url))} (kept in {plain(path)}, mode 0600)")


@ledger_app.command("create-role")
def create_role(
    name: Annotated[str, typer.Argument(help="PostgreSQL role for one coordinator, e.g. coordinator_eu")],
    pool: PoolOption,
    ledger_url: UrlOption = None,
) -> None:
    """Create a PostgreSQL role for one coordinator: it may book receipts, never change or delete them.

    Prints the coordinator's ledger URL (with the role's new password) once: give it to that coordinator
    as --ledger-url or COOP_LEDGER_URL. Run again after an upgrade to grant a role the new tables.
    """
    from coop.ledger.roles import create_coordinator_role

    ledger = _open(pool, ledger_url)  # as the owner: brings the schema up to date first
    try:
        url = create_coordinator_role(ledger.engine, name)
    finally:
        ledger.close()
    if url is None:
        console.print(f"role {quoted(name)} exists: its privileges are granted again, its password is unchanged")
        return
    console.print(f"created role {quoted(name)}; its coordinator's ledger URL (shown only this once):")
    typer.echo(f"  {url}")
