"""Fault injection for crash-safety tests: ``MEMORY_DISTILL_FAULT=<point>`` kills the process there."""

from __future__ import annotations

import os
import signal


def fault_point(name: str) -> None:
    if os.environ.get("MEMORY_DISTILL_FAULT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
