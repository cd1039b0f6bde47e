"""Moved to coop.launcher (temporary alias while the SDK tests are written)."""

from coop.launcher import LocalPool as Pool

__all__ = ["Pool"]
