"""HTML plumbing of the admin view: templates (autoescaped), security headers, form bodies."""

from __future__ import annotations

import datetime as dt
from typing import Any
from urllib.parse import parse_qs, quote

from fastapi import Request
from fastapi.responses import HTMLResponse, Response
from jinja2 import Environment, PackageLoader, StrictUndefined

from coop.errors import InvalidInput

MAX_FORM_BYTES = 16 * 1024

SECURITY_HEADERS = {
    # Everything the pages need comes from /admin/static on this origin; inline SVG needs no exception.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _when(value: dt.datetime | None) -> str:
    return "—" if value is None else value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"


def _amount(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("coop.admin", "templates"),
        autoescape=True,  # every template, whatever its name: institution names are untrusted text
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(when=_when, duration=_duration, amount=_amount, q=lambda s: quote(str(s), safe=""))
    return env


TEMPLATES = _environment()


def render(template: str, *, status_code: int = 200, **context: Any) -> HTMLResponse:
    context.setdefault("active", "")
    context.setdefault("flashes", [])
    return HTMLResponse(TEMPLATES.get_template(template).render(**context), status_code=status_code)


def with_security_headers(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    return response


async def read_form(request: Request) -> dict[str, str]:
    """An application/x-www-form-urlencoded body as {field: first value}."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise InvalidInput("forms must be posted as application/x-www-form-urlencoded")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise InvalidInput(f"a form is at most {MAX_FORM_BYTES} bytes")
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False, max_num_fields=32)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidInput(f"malformed form: {exc}") from exc
    return {name: values[0] for name, values in fields.items()}
