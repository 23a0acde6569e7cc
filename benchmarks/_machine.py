"""How busy the machine is while a benchmark runs: its load average before and after, and a guard against starting on
a busy machine.

Timings taken while other jobs share the cores are not comparable (the same evaluation benchmark measured 8.68x under
a 1-minute load of 1.6 -> 3.6 on 2 cores, and 4.43x on a quiet machine: the longer run suffered more). The guard reads
the 1-minute load average before the benchmark starts, when the benchmark itself adds nothing to it, and calls the
machine busy above `max_load_per_core` (default 0.5) per core: on 2 cores, more than one core's worth of runnable
work from other processes. It then waits, checking every `poll_s` seconds, for at most `--wait-quiet` seconds
(default 0: no wait), and warns on stderr if the machine is still busy; the benchmark runs anyway, and its results
say so beside the numbers. The load at the end includes the benchmark's own threads.

Usage in a benchmark's `main`:

    add_load_arguments(parser)
    args = parser.parse_args(argv)
    load = check_load(args.wait_quiet, args.max_load_per_core)
    ...                                   # the measurements
    load.finish()
    text += f"Machine: ... {load.describe()}."
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_MAX_LOAD_PER_CORE = 0.5


@dataclass
class MachineLoad:
    """1-, 5- and 15-minute load averages at the start (after any wait) and at the end of a benchmark run."""

    cpus: int
    threshold: float  # 1-minute load above which the machine counts as busy
    start: tuple[float, float, float]
    waited_s: float = 0.0
    end: tuple[float, float, float] | None = None

    @property
    def busy(self) -> bool:
        """Whether the 1-minute load was above the threshold when the measurements started."""
        return self.start[0] > self.threshold

    def finish(self, loadavg: Callable[[], tuple[float, float, float]] = os.getloadavg) -> None:
        self.end = tuple(loadavg())

    def describe(self) -> str:
        """One sentence fragment for a results file, e.g. `2 cores, 1-minute load average 0.3 at the start, 2.1 at
        the end (busy above 1.0)`, with a warning when the machine was busy."""
        text = f"{self.cpus} cores, 1-minute load average {self.start[0]:.2f} at the start"
        if self.end is not None:
            text += f", {self.end[0]:.2f} at the end"
        text += f" (busy above {self.threshold:.2f}"
        if self.waited_s:
            text += f"; waited {self.waited_s:.0f} s for it"
        text += ")"
        if self.busy:
            text += "; **measured on a busy machine: other jobs shared the cores, the timings are not comparable**"
        return text


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """`--wait-quiet SECONDS` and `--max-load-per-core LOAD`, the options of `check_load`."""
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait up to this long for the 1-minute load average to fall below the threshold before measuring "
        "(default 0: warn and measure at once)",
    )
    parser.add_argument(
        "--max-load-per-core",
        type=float,
        default=DEFAULT_MAX_LOAD_PER_CORE,
        metavar="LOAD",
        help=f"1-minute load average per core above which the machine counts as busy (default "
        f"{DEFAULT_MAX_LOAD_PER_CORE})",
    )


def check_load(
    wait_quiet_s: float = 0.0,
    max_load_per_core: float = DEFAULT_MAX_LOAD_PER_CORE,
    *,
    poll_s: float = 10.0,
    loadavg: Callable[[], tuple[float, float, float]] = os.getloadavg,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    cpus: int | None = None,
) -> MachineLoad:
    """Read the load before measuring; while it is above `max_load_per_core * cpus`, wait (polling every `poll_s`
    seconds) for at most `wait_quiet_s` seconds; warn on stderr if the machine is still busy. Never raises on a busy
    machine: the returned record says it, and the results file carries it."""
    cpus = cpus or os.cpu_count() or 1
    threshold = max_load_per_core * cpus
    started = clock()
    load, waited = tuple(loadavg()), 0.0
    while load[0] > threshold and waited < wait_quiet_s:
        sleep(min(poll_s, wait_quiet_s - waited))
        load, waited = tuple(loadavg()), clock() - started
    record = MachineLoad(cpus=cpus, threshold=threshold, start=load, waited_s=waited)
    if record.busy:
        waited = f" after waiting {record.waited_s:.0f} s" if wait_quiet_s else ""
        print(
            f"warning: the machine is busy{waited}: 1-minute load average {load[0]:.2f} on {cpus} cores (above "
            f"{threshold:.2f}); timings will not be comparable with a quiet machine's. Stop other jobs, or pass "
            "--wait-quiet SECONDS to wait for them.",
            file=sys.stderr,
            flush=True,
        )
    return record
