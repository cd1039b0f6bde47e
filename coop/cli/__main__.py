"""`python -m coop.cli`: how the launcher and the tests start real `coop` processes."""

from coop.cli import app

app(prog_name="coop")
