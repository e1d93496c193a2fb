#!/usr/bin/env python3
"""Container healthcheck: healthy while `fedvault server start` / `client start` holds its kit's
lock (server.lock / site.lock, an flock the kernel drops when the holder dies); a coordinator
also once it has written state/server.json (its SuperLink is up and every site registered)."""

import fcntl
import os
import sys
from pathlib import Path

STATE = Path.home() / "kit" / "state"


def main(role: str) -> str | None:
    """None when healthy, else the reason."""
    lock = STATE / ("server.lock" if role == "server" else "site.lock")
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return f"no {lock}: fedvault {role} has not started"
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        pass  # held: the fedvault command is running
    else:
        return f"{lock} is not held: fedvault {role} is not running"
    finally:
        os.close(fd)
    if role == "server" and not (STATE / "server.json").is_file():
        return "the coordinator is not ready yet (no state/server.json)"
    return None


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("server", "site"):
        sys.exit("usage: fedvault-healthcheck server|site")
    problem = main(sys.argv[1])
    if problem:
        sys.exit(f"unhealthy: {problem}")
    print("healthy")
