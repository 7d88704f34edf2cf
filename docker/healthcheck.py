#!/usr/bin/env python3
"""Container health probe for the dgserve images (stdlib only, no curl in slim images).

    dg-healthcheck PATH [PORT_ENV [DEFAULT_PORT]]

GETs http://127.0.0.1:<port><PATH> and exits 0 on a 2xx answer, 1 otherwise, printing why
(Docker keeps the last lines of a failing check in `docker inspect`). The port is read from the
environment variable PORT_ENV (default DG_PORT) so a changed port needs no new HEALTHCHECK.

    dg-healthcheck /healthz                        # gateway liveness (DG_PORT, 8000)
    dg-healthcheck /readyz DG_METRICS_PORT 9100    # worker: model loaded and Redis reachable
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/healthz"
    port_env = argv[2] if len(argv) > 2 else "DG_PORT"
    default_port = argv[3] if len(argv) > 3 else "8000"
    port = os.environ.get(port_env) or default_port
    timeout = float(os.environ.get("DG_HEALTHCHECK_TIMEOUT_S", "4"))
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (fixed loopback URL)
            if 200 <= resp.status < 300:
                return 0
            print(f"{url}: HTTP {resp.status}")
            return 1
    except urllib.error.HTTPError as exc:
        body = exc.read(300).decode("utf-8", "replace").strip()
        print(f"{url}: HTTP {exc.code} {body}")
        return 1
    except OSError as exc:
        print(f"{url}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
