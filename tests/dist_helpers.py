"""Shared by the tests that launch several processes (`accelerate launch`)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port free right now on this machine, for a launch's rendezvous (`--main_process_port`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
