"""Interrupted conversions: SIGTERM removes the partial folder; after SIGKILL the next run removes what the dead
process left. Real `python -m`-style subprocesses, paused inside the writer (after the first shard) so the signal
always lands mid-conversion; no sleeps."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from convert_helpers import make_release

from modeling_flamingo.convert.__main__ import main


def _host() -> str:
    """The host part of leftover names (docs/conversion.md): the host name, odd characters replaced by `_`."""
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())


# Runs the CLI with the writer paused after the first shard until a line arrives on stdin.
PAUSED_CLI = """
import sys
import modeling_flamingo.convert.converter as converter
from modeling_flamingo.convert.__main__ import main

real_write_shard = converter.write_shard

def paused_write_shard(*args, **kwargs):
    real_write_shard(*args, **kwargs)
    print("shard written", flush=True)
    sys.stdin.readline()

converter.write_shard = paused_write_shard
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return make_release("gpt_neox", tmp_path_factory.mktemp("release"))


def start_paused(release, out: Path) -> subprocess.Popen:
    """The CLI converting into `out` (two shards), stopped once the first shard is written."""
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSED_CLI, *release.args(out, "--quiet", "--max-shard-size", "2MB")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    if line.strip() != "shard written":
        proc.kill()
        raise AssertionError(f"the conversion did not start: {line!r} {proc.communicate()[1]}")
    return proc


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def test_sigterm_removes_the_partial_folder(release, tmp_path):
    out = tmp_path / "out"
    proc = start_paused(release, out)
    try:
        (partial,) = leftovers(tmp_path)
        assert partial.startswith(f".out.partial-{proc.pid}@{_host()}-")
        assert any((tmp_path / partial).iterdir())  # the first shard is there
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143
    assert err.strip().splitlines()[-1] == "error: terminated (SIGTERM); the partial output was removed"
    assert leftovers(tmp_path) == [] and not out.exists()


def test_after_sigkill_the_next_run_removes_the_dead_owners_leftovers(release, tmp_path):
    out = tmp_path / "out"
    proc = start_paused(release, out)
    proc.kill()  # SIGKILL: nothing can clean up
    proc.communicate(timeout=120)
    dead = proc.pid
    (partial,) = leftovers(tmp_path)
    assert partial.startswith(f".out.partial-{dead}@{_host()}-")

    # A dead owner's previous folder, taken aside during the final renames of another output: moved back.
    old = tmp_path / f".other.old-{dead}@{_host()}-abc123"
    (old / "content").mkdir(parents=True)
    (old / "content" / "config.json").write_text("{}")
    # Leftovers of a live process (this one) and of another host are not touched.
    alive = tmp_path / f".out.partial-{os.getpid()}@{_host()}-live01"
    alive.mkdir()
    elsewhere = tmp_path / f".out.partial-{dead}@some-other-host.example-xyz789"
    elsewhere.mkdir()

    assert main(release.args(out, "--quiet")) == 0
    assert (out / "config.json").is_file()
    assert json.loads((tmp_path / "other" / "config.json").read_text()) == {}
    assert leftovers(tmp_path) == sorted([alive.name, elsewhere.name])


def test_sigterm_handler_is_restored(release, tmp_path):
    """In-process: the converter's SIGTERM handler exists only while it writes."""
    before = signal.getsignal(signal.SIGTERM)
    assert main(release.args(tmp_path / "out", "--quiet")) == 0
    assert signal.getsignal(signal.SIGTERM) is before
