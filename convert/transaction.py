"""The output folder of a conversion as one transaction: nothing appears at the target until everything is written.

The converter writes into a staging folder beside the target (`.NAME.partial-PID@HOST-XXXX`) and renames it into
place at the end, after `conversion.json` (the marker: which converter wrote the folder, and the files it holds).
`--overwrite` replaces only a folder holding that marker and nothing it does not list, and the previous folder is
moved back if the final rename fails. On any error, and on SIGTERM, the staging folder (and the parents made for the
output) is removed; the leftovers of a killed process are removed by the next conversion into the same folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from .sources import ConversionError, first_line

# Written last into every conversion; `--overwrite` replaces only a folder holding it (and nothing it does not list).
MARKER_NAME = "conversion.json"
CONVERTER_ID = "modeling_flamingo.convert"
# Temporary folders beside an output: `.NAME.partial-PID@HOST-XXXX` (being written), `.NAME.old-PID@HOST-XXXX` (the
# previous folder during the final renames). The owner's pid and host let a later run remove those of a dead owner.
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)@(?P<host>[A-Za-z0-9._-]+)-[a-z0-9_]+$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"


def _listing(folder: Path, names: list[str]) -> str:
    shown = ", ".join(names[:4])
    return shown + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def conversion_files(folder: Path) -> list[str] | None:
    """The files a conversion by this converter wrote into `folder` (from its marker, whose config.json must be of
    our model type), or None when `folder` holds no such conversion."""
    from modeling_flamingo.configuration.configuration_flamingo import FlamingoConfig

    try:
        data = json.loads((folder / MARKER_NAME).read_text(encoding="utf-8"))
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (isinstance(data, dict) and data.get("converter") == CONVERTER_ID and isinstance(data.get("files"), list)):
        return None
    if not (isinstance(config, dict) and config.get("model_type") == FlamingoConfig.model_type):
        return None
    return [str(name) for name in data["files"]]


def previous_conversion_problem(folder: Path) -> str | None:
    """None when `folder` holds a conversion written by this converter and nothing else (what `overwrite` may
    replace), else what is there instead, in a few words."""
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    files = conversion_files(folder)
    if files is None:
        return f"no conversion by this converter (it holds {_listing(folder, entries)})"
    others = [name for name in entries if name not in set(files)]
    if others:
        return f"a previous conversion plus files it did not write: {_listing(folder, others)}"
    return None


def check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise ConversionError(f"output {output} exists and is not a folder")
    parent = output.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise ConversionError(f"cannot create output folder {output}: {parent} is a file, not a folder")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise ConversionError(f"output folder {output} exists and is not empty (pass --overwrite to replace it)")
        problem = previous_conversion_problem(output)
        if problem is not None:
            raise ConversionError(
                f"output folder {output} holds {problem}; --overwrite only replaces a folder this converter wrote: "
                "choose another output folder"
            )


def check_apart_from_inputs(output: Path, inputs: list[Path]) -> None:
    """Refuse an output that is, holds or lies inside an input (symlinks resolved): replacing it would delete it."""
    target = Path(os.path.realpath(output))
    for path in inputs:
        for candidate in {Path(os.path.abspath(path)), Path(os.path.realpath(path))}:
            if candidate == target or target in candidate.parents or candidate in target.parents:
                relation = "is" if candidate == target else "holds" if target in candidate.parents else "lies inside"
                raise ConversionError(
                    f"output folder {output} {relation} the input {path}: choose an output folder apart from the inputs"
                )


def _owner_alive(pid: int, host: str) -> bool:
    """Whether the process that made a leftover may still run (another host's processes cannot be checked)."""
    if host != _host():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def remove_stale_leftovers(folder: Path) -> list[Path]:
    """Remove the temporary folders of conversions into `folder` whose process is gone (killed, crashed).

    An `.old-` folder whose output no longer exists (the owner died between the two final renames) is moved back
    to its output instead of being deleted. Returns the paths handled."""
    handled: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return handled
    for path in entries:
        m = _LEFTOVER.match(path.name)
        if m is None or not path.is_dir() or path.is_symlink() or _owner_alive(int(m["pid"]), m["host"]):
            continue
        content, target = path / "content", folder / m["name"]
        if m["kind"] == "old" and content.is_dir() and not os.path.lexists(target):
            with contextlib.suppress(OSError):
                os.replace(content, target)
        shutil.rmtree(path, ignore_errors=True)
        handled.append(path)
    return handled


class ConversionTerminated(SystemExit):
    """Raised by the SIGTERM handler installed while a conversion writes: unwinds (removing the partial output)
    and ends the process with status 143 (128 + SIGTERM), as the default handler would."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


@contextlib.contextmanager
def _removed_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into `ConversionTerminated` while the body runs (main thread only; an ignored SIGTERM stays
    ignored), restoring the previous handler afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_IGN:
        yield
        return

    def handler(signum, frame):
        raise ConversionTerminated()

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextlib.contextmanager
def staging_folder(output: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary folder next to `output`, renamed to it on success and removed on failure or SIGTERM."""
    created: list[Path] = []
    parent = output.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConversionError(f"cannot create output folder {output}: {first_line(exc)}") from exc
    remove_stale_leftovers(output.parent)
    owner = f"{os.getpid()}@{_host()}"
    with _removed_on_sigterm():
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-{owner}-", dir=output.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like any other folder
        try:
            yield staging
            check_output(output, overwrite)  # it may have appeared meanwhile
            if output.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-{owner}-", dir=output.parent))
                os.replace(output, old / "content")
                try:
                    os.replace(staging, output)
                except BaseException:
                    os.replace(old / "content", output)  # put the previous conversion back
                    shutil.rmtree(old, ignore_errors=True)
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(staging, output)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            for folder in created:  # parents made for the output, innermost first
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise
