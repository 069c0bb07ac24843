"""systemd's sd_notify protocol, without libsystemd."""

from __future__ import annotations

import os
import socket


def sd_notify(message: str) -> bool:
    """Send ``READY=1`` / ``STOPPING=1`` / ``STATUS=…``; False when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(message.encode())
    except OSError:
        return False
    return True
