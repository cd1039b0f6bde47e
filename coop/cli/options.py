"""Options several command groups share, declared once so their flags and help read the same."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

MemberOption = Annotated[
    Path | None, typer.Option("--member", help="this institution's member bundle (mutual TLS, signed records)")
]
PeersOption = Annotated[
    list[str] | None, typer.Option("--initial-peers", help="DHT multiaddrs of any pool member (repeatable)")
]
ModelOption = Annotated[Path, typer.Option("--model", help="a prepared model directory")]
PoolOption = Annotated[Path, typer.Option("--pool", help="the pool directory made by `coop pool init`")]
