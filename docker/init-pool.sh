#!/bin/sh
# The demo pool's one-shot init step (docker/compose.yaml, service `init`): the commands a pool admin runs.
# Creates, once, in the `pool` volume: the pool (CA, admin token, registries) under /pool/admin, member
# bundles of two institutions and a coordinator bundle, an API key, the ledger's coordinator role in
# PostgreSQL, and a fixed identity for the DHT bootstrap peer; and prepares the demo model into /models.
# Re-running it changes nothing.
set -eu
: "${COOP_DHT_PORT:?}" "${POSTGRES_PORT:?}" "${POSTGRES_USER:?}" "${POSTGRES_PASSWORD:?}"
admin=/pool/admin

if [ ! -f /models/smollm2/manifest.json ]; then
  coop model prepare smollm2-demo --out /models/smollm2
fi

if [ ! -f /pool/bootstrap.maddr ]; then
  if [ -e "$admin" ]; then
    echo "init: $admin holds a pool an earlier init left incomplete; start over with: docker-compose down -v" >&2
    exit 1
  fi
  # the bootstrap peer's key, made now so its multiaddr is known before it starts
  peer_id=$(python - /pool/dht.identity <<'PY'
import sys
from hivemind.p2p import P2P, PeerID

P2P.generate_identity(sys.argv[1])
with open(sys.argv[1], "rb") as key:
    print(PeerID.from_identity(key.read()).to_base58())
PY
)
  bootstrap="/ip4/127.0.0.1/tcp/$COOP_DHT_PORT/p2p/$peer_id"
  coop pool init "$admin" --name "Coop Demo Pool" --bootstrap "$bootstrap" \
    --ledger-url "postgresql+psycopg://$POSTGRES_USER:$POSTGRES_PASSWORD@127.0.0.1:$POSTGRES_PORT/$POSTGRES_USER"
  coop member add "Universidad A" --pool "$admin"
  coop member add "Universidad B" --pool "$admin"
  coop member add "Demo Coordinator" --coordinator --pool "$admin"
  umask 077  # the key and the URL are secrets: their last output line, kept 0600, never in the logs
  coop member key create "Universidad B" --pool "$admin" > /tmp/key.out
  tail -n 1 /tmp/key.out | tr -d ' ' > /pool/demo-api.key
  coop ledger create-role coordinator --pool "$admin" > /tmp/role.out
  tail -n 1 /tmp/role.out | tr -d ' ' > /pool/coordinator-ledger.url
  rm -f /tmp/key.out /tmp/role.out
  umask 022
  echo "$bootstrap" > /pool/bootstrap.maddr  # last: its presence says the pool is complete
fi
echo "init: pool ready (bootstrap $(cat /pool/bootstrap.maddr))"
