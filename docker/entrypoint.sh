#!/bin/sh
# Runs `coop ARGS…` as PID 1 (exec), so SIGTERM reaches it. Two conveniences for secrets and addresses
# kept in files (as the demo pool's init step writes them), never in the environment or the image:
#   COOP_BOOTSTRAP_FILE   a DHT multiaddr, added as --initial-peers
#   COOP_LEDGER_URL_FILE  the coordinator's ledger URL, exported as COOP_COORDINATOR_LEDGER_URL
set -eu
if [ -n "${COOP_BOOTSTRAP_FILE:-}" ]; then
  set -- "$@" --initial-peers "$(cat "$COOP_BOOTSTRAP_FILE")"
fi
if [ -n "${COOP_LEDGER_URL_FILE:-}" ]; then
  COOP_COORDINATOR_LEDGER_URL=$(cat "$COOP_LEDGER_URL_FILE")
  export COOP_COORDINATOR_LEDGER_URL
fi
exec coop "$@"
