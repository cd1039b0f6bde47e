#!/usr/bin/env python3
"""Container health check: `coop-healthcheck PORT` (something accepts TCP on 127.0.0.1:PORT) or
`coop-healthcheck PORT PATH` (an HTTP GET of PATH there answers 200). Exit 0 healthy, 1 not."""

import http.client
import socket
import sys

TIMEOUT_S = 4.0


def healthy(port: int, path: str | None) -> bool:
    try:
        if path is None:
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S).close()
            return True
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
        connection.request("GET", path)
        return connection.getresponse().status == 200
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(0 if healthy(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None) else 1)
