"""Reading the conversion's inputs: local or hub paths, and weight files opened lazily.

Nothing here runs code from the inputs: pickles (`.pt`, `.bin`) are read with `torch.load(weights_only=True)`, which
refuses anything but tensors and plain containers, and configs are read as JSON.
"""

from __future__ import annotations

import io
import json
import os
import pickletools
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch

from modeling_flamingo.convert_on_load import looks_like_repo_id

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "pytorch_model.bin"
WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
# Preference order of a model folder's weight layouts (safetensors first: no pickle at all).
WEIGHT_LAYOUTS = (SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME)
TOKENIZER_PATTERNS = ["*.json", "*.model", "*.txt", "*.tiktoken", "*.vocab"]

_SNAPSHOT_COMMIT = re.compile(r"[/\\]snapshots[/\\]([0-9a-f]{40})([/\\]|$)")


class ConversionError(Exception):
    """A problem with the conversion's inputs or output folder; the message is one line meant for the user."""


def first_line(exc: BaseException | str) -> str:
    """The first non-empty line of an exception's message (torch and safetensors errors span many lines)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def first_sentence(text: str) -> str:
    """`text` up to its first full stop (torch's loader errors go on with advice that does not fit one line)."""
    text = first_line(text)
    cut = text.find(". ")
    return text if cut < 0 else text[: cut + 1]


# ---------------------------------------------------------------------------------------------------------------
# hub and local inputs


@dataclass
class HubOptions:
    """How to reach the hub: cache folder, token, and whether to stay offline (cache only)."""

    cache_dir: str | None = None
    token: str | bool | None = None
    local_files_only: bool = False
    # Set (with `local_files_only`) once the hub was found unreachable: why, for the messages.
    unreachable: str | None = None


# endpoint -> None (reachable) or why not; one probe per endpoint and process.
_PROBED: dict[str, str | None] = {}


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def check_hub_reachable(hub: HubOptions) -> None:
    """Probe the hub once (one request, no retries) before the first download; when it cannot be reached, switch
    `hub` to the local cache (`local_files_only`), remembering why for the error messages.

    huggingface_hub retries a refused connection five times with back-off (about 30 s) before it looks in the cache;
    the probe makes an unreachable hub cost one failed connection instead.
    """
    if hub.local_files_only:
        return
    endpoint = hub_endpoint()
    if endpoint not in _PROBED:
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session

        try:
            get_session().head(endpoint, timeout=constants.HF_HUB_ETAG_TIMEOUT)
            _PROBED[endpoint] = None
        except Exception as exc:
            # Transport failures (refused, DNS, timeout, proxy) mean unreachable; the session's HTTP library
            # (httpx, or the copy huggingface_hub ships) is matched by its exception names, not imported.
            names = {cls.__name__ for cls in type(exc).__mro__}
            transport = isinstance(exc, OSError) or bool(names & {"TransportError", "ConnectionError", "Timeout"})
            _PROBED[endpoint] = first_line(exc) if transport else None
    if _PROBED[endpoint] is not None:
        hub.local_files_only = True
        hub.unreachable = _PROBED[endpoint]


def unreachable_advice(hub: HubOptions) -> str:
    """What to tell the user when the hub could not be reached."""
    return (
        f"the hub ({hub_endpoint()}) could not be reached ({hub.unreachable}); to work offline set HF_HUB_OFFLINE=1 "
        "with the files already in the hub cache, or convert from local files"
    )


@dataclass
class Resolved:
    """An input located on disk.

    Attributes:
        spec: the input as the user gave it (path or repo id).
        path: the local file or folder.
        repo_id: the hub repo it came from, if any.
        revision: the revision asked for (None: default branch).
        commit: the commit the files come from, when known from the hub cache layout.
    """

    spec: str
    path: Path
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None

    def describe(self) -> str:
        """`repo@commit` for hub inputs, the path otherwise."""
        if self.repo_id is None:
            return str(self.path)
        return f"{self.repo_id}@{self.commit or self.revision or 'main'}"


def commit_of(path: str | os.PathLike) -> str | None:
    """The commit of a file inside a hub cache snapshot (`.../snapshots/<sha>/...`), else None."""
    m = _SNAPSHOT_COMMIT.search(os.fspath(path))
    return m[1] if m else None


def _hub_error(repo_id: str, what: str, exc: BaseException, hub: HubOptions | None = None) -> ConversionError:
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(exc, RepositoryNotFoundError):
        return ConversionError(f"hub repo {repo_id} not found (or not accessible with your token)")
    if isinstance(exc, RevisionNotFoundError):
        return ConversionError(f"revision not found in hub repo {repo_id}: {first_line(exc)}")
    if isinstance(exc, LocalEntryNotFoundError) and hub is not None and hub.unreachable:
        return ConversionError(f"{what} of {repo_id} is not in the local hub cache, and {unreachable_advice(hub)}")
    if isinstance(exc, LocalEntryNotFoundError):
        return ConversionError(
            f"{what} of {repo_id} is not in the local hub cache and downloads are off (offline mode)"
        )
    return ConversionError(f"could not get {what} of hub repo {repo_id}: {first_line(exc)}")


def hub_file(
    repo_id: str, filename: str, revision: str | None, hub: HubOptions, missing_ok: bool = False
) -> Path | None:
    """Download (or find in the cache) one file of a hub repo; None if it does not exist and `missing_ok`."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    check_hub_reachable(hub)
    try:
        return Path(
            hf_hub_download(
                repo_id,
                filename,
                revision=revision,
                cache_dir=hub.cache_dir,
                token=hub.token,
                local_files_only=hub.local_files_only,
            )
        )
    except EntryNotFoundError as exc:
        # Offline, a file missing from the cache is indistinguishable from one missing from the repo.
        if missing_ok and (hub.local_files_only or not isinstance(exc, LocalEntryNotFoundError)):
            return None
        raise _hub_error(repo_id, filename, exc, hub) from exc
    except Exception as exc:
        raise _hub_error(repo_id, filename, exc, hub) from exc


def hub_snapshot(repo_id: str, revision: str | None, hub: HubOptions, allow_patterns: list[str]) -> Path:
    """The small files of a hub repo (tokenizer files, configs) in one local snapshot folder."""
    from huggingface_hub import snapshot_download

    check_hub_reachable(hub)
    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=hub.cache_dir,
                token=hub.token,
                local_files_only=hub.local_files_only,
                allow_patterns=allow_patterns,
            )
        )
    except Exception as exc:
        raise _hub_error(repo_id, "the files", exc, hub) from exc


def _missing_local(spec: str, what: str) -> ConversionError:
    return ConversionError(f"{what} {spec!r} is neither an existing local path nor a hub repo id")


def resolve_checkpoint(spec: str, revision: str | None, hub: HubOptions) -> Resolved:
    """The original `checkpoint.pt`: a local file, a local folder holding `checkpoint.pt`, or a hub repo."""
    path = Path(spec).expanduser()
    if path.is_file():
        return Resolved(spec, path)
    if path.is_dir():
        if not (path / "checkpoint.pt").is_file():
            raise ConversionError(f"checkpoint folder {spec} holds no checkpoint.pt")
        return Resolved(spec, path / "checkpoint.pt")
    if not looks_like_repo_id(spec):
        raise _missing_local(spec, "checkpoint")
    file = hub_file(spec, "checkpoint.pt", revision, hub)
    return Resolved(spec, file, repo_id=spec, revision=revision, commit=commit_of(file))


def resolve_model_folder(spec: str, revision: str | None, hub: HubOptions, what: str) -> Resolved:
    """A transformers model (config.json + weights): a local folder, or a hub repo of which only the config, one
    weight layout (safetensors preferred) and, when the repo id equals the tokenizer's, nothing else is fetched."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConversionError(f"{what} folder {spec} has no config.json")
        return Resolved(spec, path)
    if path.exists() or not looks_like_repo_id(spec):
        raise _missing_local(spec, what) if not path.exists() else ConversionError(f"{what} {spec} is not a folder")
    config = hub_file(spec, "config.json", revision, hub)
    folder = config.parent
    for layout in WEIGHT_LAYOUTS:
        file = hub_file(spec, layout, revision, hub, missing_ok=True)
        if file is None:
            continue
        if layout.endswith(".index.json"):
            for shard in sorted(set(_read_index(file).values())):
                hub_file(spec, shard, revision, hub)
        break
    else:
        raise ConversionError(f"hub repo {spec} has no {' / '.join(WEIGHT_LAYOUTS)}")
    return Resolved(spec, folder, repo_id=spec, revision=revision, commit=commit_of(config))


def resolve_tokenizer_folder(spec: str, revision: str | None, hub: HubOptions) -> Resolved:
    """A tokenizer: a local folder, or the tokenizer files of a hub repo."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return Resolved(spec, path)
    if path.exists() or not looks_like_repo_id(spec):
        raise (
            _missing_local(spec, "tokenizer")
            if not path.exists()
            else ConversionError(f"tokenizer {spec} is not a folder")
        )
    folder = hub_snapshot(spec, revision, hub, TOKENIZER_PATTERNS)
    return Resolved(spec, folder, repo_id=spec, revision=revision, commit=commit_of(folder))


def resolve_vision(spec: str, revision: str | None, hub: HubOptions) -> Resolved:
    """The vision tower: an open_clip state-dict file, an HF CLIP folder, or an HF CLIP hub repo."""
    path = Path(spec).expanduser()
    if path.is_file():
        return Resolved(spec, path)
    return resolve_model_folder(spec, revision, hub, "vision model")


# ---------------------------------------------------------------------------------------------------------------
# weight files


def _is_inside_name(name: object) -> bool:
    """A relative path that stays inside its folder: no absolute path, drive, `..`, or empty part."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        return False
    posix = PurePosixPath(name)
    if posix.is_absolute() or PureWindowsPath(name).drive:
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def _read_index(path: Path) -> dict[str, str]:
    """The weight map of an index json; every shard name is checked to stay inside the folder before anything
    (a file, a download) is opened with it."""
    try:
        with open(path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConversionError(f"cannot read the weight index {path}: {first_line(exc)}") from exc
    if not isinstance(weight_map, dict):
        raise ConversionError(f"the weight index {path} has no weight_map")
    for key, name in weight_map.items():
        if not _is_inside_name(name):
            raise ConversionError(
                f"the weight index {path} lists {name!r} for {key}: shard names must be files inside the model folder"
            )
    return weight_map


def read_json(path: Path, what: str) -> dict:
    """A JSON object from a file, or a ConversionError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConversionError(f"cannot read {what} {path}: {first_line(exc)}") from exc
    if not isinstance(data, dict):
        raise ConversionError(f"{what} {path} is not a JSON object")
    return data


@dataclass
class TensorInfo:
    """Shape of one stored tensor (its data stays on disk)."""

    shape: tuple[int, ...]


_STRING_OPS = {
    "STRING",
    "BINSTRING",
    "SHORT_BINSTRING",
    "UNICODE",
    "BINUNICODE",
    "SHORT_BINUNICODE",
    "BINUNICODE8",
}
_NON_PUSHING_OPS = {"PROTO", "FRAME", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "STOP", "POP", "POP_MARK", "MARK"}


def _pickle_streams(path: Path) -> list[bytes]:
    """The pickle(s) of a torch file, without unpickling: `data.pkl` of a zip file, else the whole legacy file."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            return [archive.read(names[0])] if names else []
    with open(path, "rb") as f:
        return [f.read()]


def pickle_globals(path: Path) -> list[str]:
    """Every global (`module.name`) a torch pickle file imports, read from its opcodes (nothing is executed).

    A legacy (pre-zip) file is several pickles in a row; the scan goes on until one fails to parse (the raw tensor
    data that follows them)."""
    found: list[str] = []
    for data in _pickle_streams(path):
        stream = io.BytesIO(data)
        while stream.tell() < len(data):
            pushed: list[object] = []  # what each op pushed (strings, else None): STACK_GLOBAL takes the last two
            memo: dict[int, object] = {}
            try:
                for op, arg, _ in pickletools.genops(stream):
                    name = op.name
                    if name in ("GLOBAL", "INST"):
                        found.append(".".join(str(arg).split(" ", 1)))
                        pushed.append(None)
                    elif name == "STACK_GLOBAL":
                        module, attr = (pushed[-2:] + [None, None])[:2] if len(pushed) >= 2 else (None, None)
                        found.append(f"{module}.{attr}" if isinstance(module, str) and isinstance(attr, str) else "?")
                        pushed.append(None)
                    elif name == "MEMOIZE":
                        memo[len(memo)] = pushed[-1] if pushed else None
                    elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                        memo[int(arg)] = pushed[-1] if pushed else None
                    elif name in ("GET", "BINGET", "LONG_BINGET"):
                        pushed.append(memo.get(int(arg)))
                    elif name in _STRING_OPS:
                        pushed.append(arg if isinstance(arg, str) else None)
                    elif name not in _NON_PUSHING_OPS:
                        pushed.append(None)
            except Exception:
                break
    # Protocol 2 pickles spell builtins `__builtin__` (pickle maps it back on load).
    return list(dict.fromkeys(re.sub(r"^__builtin__\.", "builtins.", name) for name in found))


def disallowed_globals(path: Path) -> list[str]:
    """The globals of a torch pickle file that `torch.load(weights_only=True)` refuses (empty if unknown)."""
    try:
        from torch import _weights_only_unpickler as wou

        allowed = set(wou._get_allowed_globals()) | set(wou._get_user_allowed_globals())
        names = pickle_globals(path)
    except Exception:
        return []
    return [n for n in names if n not in allowed]


class WeightFile:
    """One weight file, opened lazily and closed when done, so its pages leave memory.

    `.safetensors` files are read through `safe_open` (only the requested slices are read); `.pt`/`.bin` files with
    `torch.load(weights_only=True, mmap=True)`, so tensors stay on disk until touched. Nested training checkpoints
    (`model_state_dict`, `state_dict`) are unwrapped.

    Args:
        path: the file.
        label: what the file is, for messages ("checkpoint", "language model file", ...).
        nested: unwrap `model_state_dict` / `state_dict` (training checkpoints).
    """

    def __init__(self, path: Path, label: str, nested: bool = False):
        self.path = Path(path)
        self.label = label
        self.nested = nested
        self._st = None  # safe_open handle
        self._tensors: dict[str, torch.Tensor] | None = None

    @property
    def is_safetensors(self) -> bool:
        return self.path.suffix == ".safetensors"

    def __repr__(self) -> str:
        return f"WeightFile({str(self.path)!r})"

    def open(self) -> WeightFile:
        if self._st is not None or self._tensors is not None:
            return self
        if not self.path.is_file():
            raise ConversionError(f"{self.label} {self.path} does not exist")
        if self.is_safetensors:
            from safetensors import safe_open

            try:
                self._st = safe_open(str(self.path), framework="pt")
            except Exception as exc:
                raise ConversionError(
                    f"cannot read {self.label} {self.path}: truncated or not a safetensors file ({first_line(exc)})"
                ) from exc
        else:
            self._tensors = self._load_pickle()
        return self

    def _load_pickle(self) -> dict[str, torch.Tensor]:
        try:
            try:
                obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap can only be used" not in str(exc):
                    raise
                # A pre-zip (torch < 1.6) file cannot be memory-mapped: read it whole, still tensors only.
                obj = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:
            message = str(exc)
            if "Weights only load failed" in message or "WeightsUnpickler" in message:
                raise ConversionError(
                    f"{self.label} {self.path} holds Python objects other than tensors; refusing to unpickle them "
                    f"(weights_only=True): {self._refusal_detail(message)}"
                ) from exc
            raise ConversionError(
                f"cannot read {self.label} {self.path}: truncated or not a PyTorch weight file "
                f"({first_sentence(message)})"
            ) from exc
        if self.nested and isinstance(obj, dict):
            for name in ("model_state_dict", "state_dict"):
                if isinstance(obj.get(name), dict):
                    obj = obj[name]
                    break
        if not isinstance(obj, dict):
            raise ConversionError(f"{self.label} {self.path} does not hold a state dict (got {type(obj).__name__})")
        for key, value in obj.items():
            if not isinstance(key, str) or not isinstance(value, torch.Tensor):
                raise ConversionError(
                    f"{self.label} {self.path} is not a state dict: entry {key!r} holds a {type(value).__name__}"
                )
        return obj

    def _refusal_detail(self, message: str) -> str:
        """What weights_only refused, in a few words: the globals the pickle imports that it does not allow (read
        from the pickle's opcodes, so also when torch's message stops at an unsupported opcode), else torch's
        reason."""
        refused = disallowed_globals(self.path)
        named = re.search(r"Unsupported global: GLOBAL (\S+)", message)
        if named:
            name = named[1] if "." in named[1] else f"builtins.{named[1]}"
            refused = [name] + [n for n in refused if n != name]
        if refused:
            more = f" (and {len(refused) - 3} more)" if len(refused) > 3 else ""
            return f"unsupported global{'s' if len(refused) > 1 else ''} {', '.join(refused[:3])}{more}"
        lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
        for i, line in enumerate(lines):
            if "WeightsUnpickler error" in line:
                rest = line.split("WeightsUnpickler error:", 1)[1].strip()
                detail = rest or (lines[i + 1] if i + 1 < len(lines) else "")
                return first_sentence(detail) or "unsupported content"
        return "unsupported content"

    def close(self) -> None:
        # Dropping the last references unmaps the file.
        self._st = None
        self._tensors = None

    def keys(self) -> list[str]:
        self.open()
        return list(self._st.keys()) if self._st is not None else list(self._tensors)

    def infos(self) -> dict[str, TensorInfo]:
        """Shapes of every tensor, read from the header (safetensors) or the pickle's metadata."""
        self.open()
        if self._st is not None:
            return {k: TensorInfo(tuple(self._st.get_slice(k).get_shape())) for k in self._st.keys()}
        return {k: TensorInfo(tuple(t.shape)) for k, t in self._tensors.items()}

    def read(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """The tensor `key`, or its rows `start:stop` along dim 0 (only those are read from disk)."""
        self.open()
        try:
            if self._st is not None:
                if start is None:
                    return self._st.get_tensor(key)
                return self._st.get_slice(key)[start:stop]
            tensor = self._tensors[key]
        except Exception as exc:
            raise ConversionError(f"cannot read {key} from {self.label} {self.path}: {first_line(exc)}") from exc
        return tensor if start is None else tensor[start:stop]

    def raw(self) -> dict[str, torch.Tensor]:
        """The pickled state dict itself (`.pt`/`.bin` only), tensors still memory-mapped."""
        self.open()
        if self._tensors is None:
            raise TypeError("raw() is only for pickled weight files")
        return self._tensors


@dataclass
class WeightFolder:
    """The weight files of a transformers model folder, in one layout (safetensors preferred).

    Attributes:
        files: weight files in name order.
        index: key -> file name, from the index json (sharded layouts) or None (single file: keys read on demand).
    """

    folder: Path
    files: list[WeightFile] = field(default_factory=list)
    index: dict[str, str] | None = None

    @classmethod
    def find(cls, folder: Path, label: str) -> WeightFolder:
        for layout in WEIGHT_LAYOUTS:
            path = folder / layout
            if not path.is_file():
                continue
            if layout.endswith(".index.json"):
                index = _read_index(path)
                names = sorted(set(index.values()))
                for name in names:
                    if not (folder / name).is_file():
                        raise ConversionError(f"{label} shard {folder / name} (listed in {layout}) does not exist")
                return cls(folder, [WeightFile(folder / n, label) for n in names], index)
            return cls(folder, [WeightFile(path, label)])
        raise ConversionError(f"{label} folder {folder} has none of {', '.join(WEIGHT_LAYOUTS)}")

    def __iter__(self) -> Iterator[WeightFile]:
        return iter(self.files)
