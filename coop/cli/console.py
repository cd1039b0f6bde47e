"""The consoles every `coop` command prints to, and helpers for printing user-supplied text.

Output goes through rich markup, so anything that came from a user or a file (a name, a path, an
error message) is escaped before it is printed: a '[' in an institution's name stays a '['.
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape

console = Console(soft_wrap=True, highlight=False)
err_console = Console(stderr=True, soft_wrap=True, highlight=False)


def quoted(text: str) -> str:
    """A user-supplied name, quoted and markup-safe: 'Uni [x]'."""
    return escape(repr(text))


def plain(value: object) -> str:
    """Any value (a path, a message) as markup-safe text."""
    return escape(str(value))
