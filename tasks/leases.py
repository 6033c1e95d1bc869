"""Who may submit a shard: the holder of its submit lease, recorded in the manifest.

A lease names its owner (`host:pid:nonce`) and an expiry. Taking one is a manifest transition
saved by compare-and-swap, so of any number of stage runs, pollers and CLI commands racing on one
run exactly one holds a shard's lease; the others adopt whatever it records. A lease is free again
once it has expired, or at once when its owner was a process on this host that no longer exists
(a crashed `nightbatch run` resumed on the same machine need not wait for the expiry)."""

from __future__ import annotations

import os
import socket
import uuid


def new_owner() -> str:
    """A lease owner unique to this call: host, process and a random nonce."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_is_gone(owner: str | None) -> bool:
    """True only when the owner was a process of this host that has exited (never guesses about
    other hosts: their leases are free at expiry)."""
    if not owner:
        return True
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
