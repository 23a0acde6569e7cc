"""Streaming conversion of an original OpenFlamingo checkpoint into a transformers model folder.

The conversion never holds the model in memory:

1. Every input is opened lazily: `checkpoint.pt` and `.bin` files with `torch.load(weights_only=True, mmap=True)`,
   safetensors with `safe_open`. Only shapes are read while planning.
2. The config is assembled from the inputs (language model config.json read as JSON, embedding rows and the
   cross-attention interval read from the checkpoint, token ids from the tokenizer), and a `torch.device("meta")`
   instance of `FlamingoForConditionalGeneration` gives the expected names and shapes. Every missing, unexpected or
   mis-shaped tensor is reported before anything is written.
3. Output tensors are grouped by the input file they come from (checkpoint, vision tower, then each language model
   shard in turn), sharded in that order, and written slice by slice; each input is closed (unmapped) when the
   writer moves on to the next, so at most one input file's pages are resident at a time.
4. Everything is written into a temporary folder next to the target and renamed at the end; on any error the
   temporary folder is removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modeling_flamingo.processing.processing_flamingo import EOC_TOKEN, MEDIA_TOKEN, add_flamingo_tokens

from .mapping import (
    IGNORED_BUFFER_PATTERNS,
    canonical_original_key,
    flamingo_key,
    hf_clip_vision_key,
    language_model_key,
    open_clip_vision_targets,
    rename_lm_key,
    strip_wrapper_prefixes,
)
from .presets import PRESETS, get_preset
from .sources import (
    ConversionError,
    HubOptions,
    Resolved,
    WeightFile,
    WeightFolder,
    first_line,
    read_json,
    resolve_checkpoint,
    resolve_model_folder,
    resolve_tokenizer_folder,
    resolve_vision,
)
from .writer import (
    SAFE_WEIGHTS_INDEX_NAME,
    PlannedTensor,
    SourceTracker,
    parse_shard_size,
    plan_shards,
    write_index,
    write_shard,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Keys of a language model's hub config.json that describe the remote code or the saving run, not the model.
_DROPPED_LM_CONFIG_KEYS = (
    "auto_map",
    "architectures",
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
)
# open_clip's ViTs (every OpenFlamingo release) use heads of 64.
OPEN_CLIP_HEAD_WIDTH = 64


@dataclass
class ConversionSpec:
    """What to convert. Paths may be local paths or hub repo ids.

    Attributes:
        checkpoint: the original `checkpoint.pt` (file, folder holding it, or hub repo).
        vision_model: HF CLIP folder/repo, or an open_clip vision state-dict file.
        language_model: the language model's transformers folder/repo (config.json + weights).
        tokenizer: the tokenizer folder/repo; defaults to `language_model`.
        cross_attn_every_n_layers: interval of the cross-attention blocks; read from the checkpoint when None.
        dtype: output dtype of floating tensors ("float32", "bfloat16", "float16").
        max_shard_size: output shard size limit ("5GB").
        vision_hidden_act: activation of an open_clip vision tower (OpenAI weights: QuickGELU).
        preset: the release repo id this spec was built from, for the model card.
    """

    checkpoint: str
    vision_model: str
    language_model: str
    tokenizer: str | None = None
    cross_attn_every_n_layers: int | None = None
    checkpoint_revision: str | None = None
    vision_model_revision: str | None = None
    language_model_revision: str | None = None
    tokenizer_revision: str | None = None
    dtype: str = "float32"
    max_shard_size: str | int = "5GB"
    vision_hidden_act: str = "quick_gelu"
    preset: str | None = None

    @classmethod
    def from_preset(cls, repo_id: str, **overrides) -> ConversionSpec:
        """The spec of a released model; `overrides` (non-None values) replace its defaults."""
        preset = get_preset(repo_id)
        if preset is None:
            raise ConversionError(f"unknown preset {repo_id!r}; known presets: {', '.join(PRESETS)}")
        overrides = {k: v for k, v in overrides.items() if v is not None}
        language_model = overrides.pop("language_model", None) or preset.language_model
        if language_model is None:
            raise ConversionError(
                f"preset {preset.repo_id} needs the LLaMA-7B weights in transformers format: pass the folder with "
                "--language-model (and its tokenizer with --tokenizer if it is elsewhere)"
            )
        lm_revision = overrides.pop("language_model_revision", None)
        if lm_revision is None and language_model == preset.language_model:
            lm_revision = preset.language_model_revision
        values = {
            "checkpoint": preset.repo_id,
            "vision_model": preset.vision_model,
            "language_model": language_model,
            "language_model_revision": lm_revision,
            "cross_attn_every_n_layers": preset.cross_attn_every_n_layers,
            "preset": preset.repo_id,
        }
        values.update(overrides)
        return cls(**values)


@dataclass
class _Plan:
    """Everything the writer needs, and what the model card reports."""

    config: object
    tokenizer: object
    tensors: list[PlannedTensor]
    total_parameters: int
    sources: dict[str, Resolved]
    checkpoint_sha256: str
    vision_kind: str
    notes: list[str] = field(default_factory=list)
    # For local inputs (no hub revision to name): role -> [(file name, sha256)] of its weight (or tokenizer) files.
    local_files: dict[str, list[tuple[str, str]]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# public entry point


def convert(
    spec: ConversionSpec,
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    hub: HubOptions | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
    allow_non_finite: bool = False,
) -> Path:
    """Convert `spec` into a transformers model folder at `output_dir` and return its path.

    Args:
        spec: the inputs (see `ConversionSpec`).
        output_dir: the folder to create. It may not be, hold or lie inside any local input. An existing non-empty
            folder is refused unless `overwrite` and it holds a previous conversion (see `is_previous_conversion`).
        overwrite: replace a previous conversion at `output_dir` (only once the new one is complete).
        hub: hub access options (cache folder, token, offline).
        progress: show tqdm progress bars; None shows them when stderr is a terminal.
        log: receives one line per step (nothing when None).
        allow_non_finite: write NaN and inf values instead of refusing them.

    Raises:
        ConversionError: any problem with the inputs or the output folder, with a one-line message.
    """
    hub = hub or HubOptions()
    log = log or (lambda message: None)
    if not os.fspath(output_dir).strip():
        raise ConversionError("empty output folder path: name the folder to create (--output-dir)")
    output = Path(output_dir).expanduser().absolute()
    local = [spec.checkpoint, spec.vision_model, spec.language_model, spec.tokenizer]
    _check_apart_from_inputs(output, [Path(p).expanduser() for p in local if p and os.path.exists(p)])
    _check_output(output, overwrite)
    if spec.dtype not in DTYPES:
        raise ConversionError(f"unsupported dtype {spec.dtype!r}; choose from {', '.join(DTYPES)}")
    max_shard_size = parse_shard_size(spec.max_shard_size)

    with _quiet_transformers():
        plan = _plan(spec, hub, log)
        _check_apart_from_inputs(output, [src.path for src in plan.sources.values()])
        shards = plan_shards(plan.tensors, max_shard_size)
        with _staging_folder(output, overwrite) as staging:
            _write(plan, shards, staging, progress, log, allow_non_finite)
            _write_metadata(plan, spec, shards, staging)
    log(f"wrote {output}")
    return output


# ---------------------------------------------------------------------------------------------------------------
# output folder handling

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


def _check_output(output: Path, overwrite: bool) -> None:
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


def _check_apart_from_inputs(output: Path, inputs: list[Path]) -> None:
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
def _staging_folder(output: Path, overwrite: bool) -> Iterator[Path]:
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
            _check_output(output, overwrite)  # it may have appeared meanwhile
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


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Keep transformers' and Python's warnings off stderr: the CLI reports on stderr in one line."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


# ---------------------------------------------------------------------------------------------------------------
# planning


def _plan(spec: ConversionSpec, hub: HubOptions, log: Callable[[str], None]) -> _Plan:
    # 1. Locate everything (downloads happen here).
    ckpt_src = resolve_checkpoint(spec.checkpoint, spec.checkpoint_revision, hub)
    lm_src = resolve_model_folder(spec.language_model, spec.language_model_revision, hub, "language model")
    tok_spec = spec.tokenizer or spec.language_model
    tok_revision = spec.tokenizer_revision
    if tok_revision is None and tok_spec == spec.language_model:
        tok_revision = spec.language_model_revision
    tok_src = lm_src if tok_spec == spec.language_model and lm_src.repo_id is None else None
    tok_src = tok_src or resolve_tokenizer_folder(tok_spec, tok_revision, hub)
    vision_src = resolve_vision(spec.vision_model, spec.vision_model_revision, hub)
    sources = {"checkpoint": ckpt_src, "language_model": lm_src, "tokenizer": tok_src, "vision_model": vision_src}

    # 2. The language model's config, read as JSON: no remote code runs.
    text_config = _language_model_config(lm_src.path / "config.json")
    model_type = text_config.model_type
    log(f"language model: {lm_src.describe()} ({model_type}, {text_config.num_hidden_layers} layers)")
    log(f"vision model: {vision_src.describe()}; tokenizer: {tok_src.describe()}")
    layers_attr = _decoder_layers_attr_name(text_config, lm_src.path / "config.json")
    num_layers = text_config.num_hidden_layers

    # 3. The checkpoint: names and shapes; aliases checked equal.
    log(f"checkpoint: {ckpt_src.describe()}")
    checkpoint = WeightFile(ckpt_src.path, "checkpoint", nested=True)
    ckpt_keys = _checkpoint_keys(checkpoint, layers_attr)  # canonical original key -> stored key
    ckpt_infos = checkpoint.infos()
    ckpt_shapes = {k: tuple(ckpt_infos[stored].shape) for k, stored in ckpt_keys.items()}
    checkpoint_sha256 = file_sha256(ckpt_src.path)

    every_n = _cross_attn_interval(ckpt_shapes, layers_attr, num_layers, spec.cross_attn_every_n_layers)
    emb_name, out_emb_name = _embedding_names(text_config)
    emb_key = f"lang_encoder.{emb_name}"
    if emb_key not in ckpt_shapes:
        raise ConversionError(
            f"missing key {emb_key} in the checkpoint: it must hold the language model's input embeddings "
            "(with the rows of the added Flamingo tokens)"
        )
    vocab_rows = ckpt_shapes[emb_key][0]
    text_config.vocab_size = vocab_rows
    # Hub configs of MPT disable the cache for training; generation wants it.
    text_config.use_cache = True
    if model_type == "mosaic_gpt":
        # MosaicGPT's `no_bias` is not a reliable account of its weights (some copies of its code create every Linear
        # and LayerNorm with a bias whatever it says): the weight files decide.
        lm_folder = WeightFolder.find(lm_src.path, "language model file")
        has_bias = False
        for file in lm_folder:
            has_bias = has_bias or any(key.endswith(".bias") for key in file.infos())
            file.close()
        if text_config.no_bias == has_bias:
            log(
                f"MosaicGPT no_bias={text_config.no_bias} in config.json, but the weights {'have' if has_bias else 'lack'} biases: following the weights"
            )
        text_config.no_bias = not has_bias

    # 4. Tokenizer with the Flamingo tokens, added as the original factory adds them.
    tokenizer = _load_tokenizer(tok_src.path)
    add_flamingo_tokens(tokenizer)
    if len(tokenizer) != vocab_rows:
        raise ConversionError(
            f"the tokenizer ({tok_src.describe()}) has {len(tokenizer)} tokens once <|endofchunk|>, <image> (and "
            f"<PAD>) are added, but the checkpoint's embeddings have {vocab_rows} rows: wrong --tokenizer or "
            "--language-model?"
        )
    media_id = tokenizer.encode(MEDIA_TOKEN)[-1]
    eoc_id = tokenizer.encode(EOC_TOKEN)[-1]

    # 5. Vision tower config and its weight source.
    vision_config, vision_files, vision_kind = _vision(vision_src, spec.vision_hidden_act)

    log(f"cross-attention every {every_n} layers, {vocab_rows} tokens (<image> {media_id}, <|endofchunk|> {eoc_id})")

    # 6. The config, and a meta model giving every expected name and shape.
    config = _flamingo_config(vision_config, text_config, every_n, media_id, eoc_id, ckpt_shapes, spec.dtype)
    model = _meta_model(config)
    tied = set(model.all_tied_weights_keys)
    expected = {k: (tuple(t.shape), t.dtype) for k, t in model.state_dict().items() if k not in tied}
    order = {k: i for i, k in enumerate(expected)}
    lm_ignore = [
        re.compile(p) for p in (getattr(model.language_model, "_keys_to_ignore_on_load_unexpected", None) or [])
    ]
    ignore = [re.compile(p) for p in IGNORED_BUFFER_PATTERNS]
    total_parameters = sum(math.prod(s) for s, _ in expected.values())
    del model

    planner = _Planner(expected, tied, spec.dtype, lm_ignore, ignore)
    notes: list[str] = []

    # 7. Providers in priority order: the checkpoint, then the vision tower, then the language model's files.
    ckpt_vision: dict[str, str] = {}
    for canonical, stored in ckpt_keys.items():
        if canonical.startswith("vision_encoder."):
            ckpt_vision[canonical[len("vision_encoder.") :]] = stored
            continue
        try:
            ours = flamingo_key(canonical)
        except KeyError:
            raise ConversionError(f"unexpected key {stored} in the checkpoint {ckpt_src.path}") from None
        if ours is None:
            continue
        if ours.startswith("language_model."):
            ours = "language_model." + rename_lm_key(ours[len("language_model.") :], model_type)
        if ours in tied:
            _check_tied_copy(checkpoint, stored, ckpt_keys.get(emb_key), ours)
            continue
        planner.add(ours, checkpoint, stored, ckpt_shapes[canonical], what=f"{stored} (checkpoint)")
    for rest, stored in ckpt_vision.items():
        _add_open_clip(planner, checkpoint, rest, stored, ckpt_shapes[f"vision_encoder.{rest}"], "checkpoint")

    if vision_kind == "open_clip":
        (file, keymap) = vision_files
        infos = file.infos()
        for rest, stored in keymap.items():
            _add_open_clip(planner, file, rest, stored, infos[stored].shape, f"vision file {file.path}")
        file.close()
    else:
        for file in vision_files:
            for key, info in file.infos().items():
                name = hf_clip_vision_key(key)
                if name is None or planner.ignorable(f"vision_encoder.{name}", key):
                    continue  # the text tower and the projection heads of a CLIPModel, known buffers
                planner.add(f"vision_encoder.{name}", file, key, info.shape, what=f"{key} ({file.path.name})")
            file.close()

    lm_files = WeightFolder.find(lm_src.path, "language model file")
    for file in lm_files:
        for key, info in file.infos().items():
            rel = rename_lm_key(key, model_type)
            ours = language_model_key(rel, layers_attr)
            if ours in tied or planner.ignorable(ours, rel, lm=True):
                continue
            resize = out_emb_name is not None and ours == f"language_model.{out_emb_name}"
            if resize and ours not in planner.provided and info.shape[0] != vocab_rows:
                notes.append(planner.add_resized_head(ours, file, key, info.shape, vocab_rows))
                continue
            planner.add(ours, file, key, info.shape, what=f"{key} ({file.path.name})")
        file.close()
    checkpoint.close()

    planner.check_complete()
    groups = {id(checkpoint): 0}
    for f in [vision_files[0]] if vision_kind == "open_clip" else vision_files:
        groups.setdefault(id(f), len(groups))
    for f in lm_files:
        groups.setdefault(id(f), len(groups))
    tensors = sorted(planner.provided.values(), key=lambda t: (groups[id(t.source)], order[t.key]))
    local_files = _local_file_hashes(sources, checkpoint_sha256)
    return _Plan(
        config, tokenizer, tensors, total_parameters, sources, checkpoint_sha256, vision_kind, notes, local_files
    )


# Tokenizer files recorded (with their sha256) for a local tokenizer folder.
_TOKENIZER_FILE = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\..*|merges\.txt|.*\.model|.*\.tiktoken)$"
)


def _local_file_hashes(sources: dict[str, Resolved], checkpoint_sha256: str) -> dict[str, list[tuple[str, str]]]:
    """File names and sha256 of the local inputs' weight files (tokenizer files for a tokenizer), for the model card:
    a local path means nothing elsewhere, the hashes identify the files."""
    out: dict[str, list[tuple[str, str]]] = {}
    for role, src in sources.items():
        if src.repo_id is not None:
            continue
        if role == "checkpoint":
            out[role] = [(src.path.name, checkpoint_sha256)]
        elif src.path.is_file():
            out[role] = [(src.path.name, file_sha256(src.path))]
        elif role == "tokenizer":
            files = sorted(p for p in src.path.iterdir() if p.is_file() and _TOKENIZER_FILE.match(p.name))
            out[role] = [(p.name, file_sha256(p)) for p in files]
        else:
            out[role] = [(f.path.name, file_sha256(f.path)) for f in WeightFolder.find(src.path, "weight file")]
    return out


# Which input should hold a tensor, for "missing key" messages.
_EXPECTED_IN = (
    ("vision_encoder.", "the vision model"),
    ("perceiver.", "the checkpoint"),
    ("language_model.", "the checkpoint or the language model files"),
)


class _Planner:
    """Collects one provider per expected tensor, checking names and shapes."""

    def __init__(self, expected, tied, dtype, lm_ignore, ignore):
        self.expected: dict[str, tuple[tuple[int, ...], torch.dtype]] = expected
        self.tied = tied
        self.dtype = DTYPES[dtype]
        self.lm_ignore = lm_ignore
        self.ignore = ignore
        self.provided: dict[str, PlannedTensor] = {}

    def ignorable(self, ours: str, original: str, lm: bool = False) -> bool:
        """An unexpected name transformers would also skip (known buffers, the LM class's ignore patterns)."""
        if ours in self.expected:
            return False
        patterns = self.ignore + (self.lm_ignore if lm else [])
        return any(p.search(original) for p in patterns)

    def _out_dtype(self, ours: str) -> torch.dtype:
        dtype = self.expected[ours][1]
        return self.dtype if dtype.is_floating_point else dtype

    def add(self, ours: str, file: WeightFile, key: str, shape: tuple[int, ...], what: str, chunk: int | None = None):
        if ours not in self.expected:
            raise ConversionError(f"unexpected key {what}: the model has no {ours}")
        if ours in self.provided:
            return  # a higher-priority input already gives it
        stored_shape = tuple(shape)
        if chunk is not None:
            stored_shape = (stored_shape[0] // 3, *stored_shape[1:])
        want = self.expected[ours][0]
        if stored_shape != want:
            raise ConversionError(
                f"shape mismatch for {what}: it is {list(stored_shape)} but the model's {ours} is {list(want)}"
            )
        if chunk is None:
            read = _reader(file, key)
        else:
            offset = chunk * want[0]
            read = _reader(file, key, offset)
        self.provided[ours] = PlannedTensor(ours, want, self._out_dtype(ours), read, file, origin=what)

    def add_resized_head(self, ours: str, file: WeightFile, key: str, shape: tuple[int, ...], rows: int) -> str:
        """An output embedding with a different row count than the vocabulary (the v1 LLaMA checkpoint keeps only
        the input embeddings): extra rows get the mean of the pretrained rows, surplus rows are dropped."""
        want = self.expected[ours][0]
        if tuple(shape[1:]) != tuple(want[1:]):
            raise ConversionError(
                f"shape mismatch for {key} ({file.path.name}): {list(shape)} vs the model's {list(want)}"
            )
        stored = shape[0]
        state: dict[str, torch.Tensor] = {}

        def mean_row() -> torch.Tensor:
            if "mean" not in state:
                total = torch.zeros(shape[1:], dtype=torch.float64)
                step = max(1, (64 << 20) // (8 * max(1, math.prod(shape[1:]))))
                for i in range(0, stored, step):
                    total += file.read(key, i, min(i + step, stored)).to(torch.float64).sum(0)
                state["mean"] = (total / stored).to(torch.float32)
            return state["mean"]

        def read(start: int | None, stop: int | None) -> torch.Tensor:
            parts = []
            if start < min(stop, stored):
                parts.append(file.read(key, start, min(stop, stored)).to(torch.float32))
            if stop > stored:
                extra = stop - max(start, stored)
                parts.append(mean_row().unsqueeze(0).expand(extra, *shape[1:]))
            return torch.cat(parts) if len(parts) > 1 else parts[0]

        origin = f"{key} ({file.label} {file.path.name})"
        self.provided[ours] = PlannedTensor(ours, want, self._out_dtype(ours), read, file, origin=origin)
        if stored < rows:
            return (
                f"`{ours}`: the checkpoint does not hold the output embedding; it comes from the language model, "
                f"whose {stored} rows lack the {rows - stored} tokens added for Flamingo (ids {stored}-{rows - 1}). "
                f"Those rows are set to the mean of the {stored} pretrained rows (the original code leaves them "
                "random at every load)."
            )
        return f"`{ours}`: the language model's {stored} rows were cut to the {rows} tokens of the tokenizer."

    def check_complete(self) -> None:
        missing = [k for k in self.expected if k not in self.provided]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            where = next((w for prefix, w in _EXPECTED_IN if missing[0].startswith(prefix)), "the inputs")
            raise ConversionError(f"missing key {missing[0]}{more}: not in {where}")


def _reader(file: WeightFile, key: str, offset: int = 0) -> Callable[[int | None, int | None], torch.Tensor]:
    def read(start: int | None, stop: int | None) -> torch.Tensor:
        if start is None:
            return file.read(key)
        return file.read(key, offset + start, offset + stop)

    return read


def _add_open_clip(planner: _Planner, file: WeightFile, rest: str, stored: str, shape, where: str) -> None:
    try:
        targets = open_clip_vision_targets(rest)
    except KeyError:
        if planner.ignorable("vision_encoder." + rest, rest):
            return
        raise ConversionError(f"unexpected key {stored} in the {where}: not a CLIP vision tower weight") from None
    for name, chunk in targets:
        planner.add(f"vision_encoder.{name}", file, stored, shape, what=f"{stored} ({where})", chunk=chunk)


def _check_tied_copy(checkpoint: WeightFile, stored: str, emb_stored: str | None, ours: str) -> None:
    """A tied head saved next to the embeddings (transformers' MPT keeps both names) must equal them."""
    if emb_stored is None or not _same_tensor(checkpoint, stored, emb_stored):
        raise ConversionError(
            f"the checkpoint's {stored} differs from its input embeddings, but this language model ties them ({ours})"
        )


def _checkpoint_keys(checkpoint: WeightFile, layers_attr: str) -> dict[str, str]:
    """Canonical original key -> the key stored in the checkpoint (wrappers stripped, aliases checked equal)."""
    canonical: dict[str, str] = {}
    aliases: list[tuple[str, str]] = []
    for stored in checkpoint.keys():
        name, is_alias = canonical_original_key(strip_wrapper_prefixes(stored), layers_attr)
        if is_alias:
            aliases.append((name, stored))
        elif name in canonical:
            _check_same(checkpoint, canonical[name], stored)
        else:
            canonical[name] = stored
    for name, stored in aliases:
        if name in canonical:
            _check_same(checkpoint, canonical[name], stored)
        else:
            canonical[name] = stored
    return canonical


def _same_tensor(file: WeightFile, a: str, b: str) -> bool:
    """Whether two tensors of one file (pickle or safetensors) have the same shape and values."""
    first, second = file.read(a), file.read(b)
    return first.shape == second.shape and torch.equal(first, second)


def _check_same(checkpoint: WeightFile, a: str, b: str) -> None:
    if not _same_tensor(checkpoint, a, b):
        raise ConversionError(f"the checkpoint holds two different values for one weight: {b} differs from {a}")


_XATTN_LAYER = re.compile(r"^lang_encoder\.(.+)\.(\d+)\.gated_cross_attn_layer\.")


def _cross_attn_interval(shapes: dict, layers_attr: str, num_layers: int, requested: int | None) -> int:
    """Check (or infer) the cross-attention interval from the layers that carry a block in the checkpoint."""
    layers: set[int] = set()
    for key in shapes:
        m = _XATTN_LAYER.match(key)
        if m is None:
            continue
        if m[1] != layers_attr:
            raise ConversionError(
                f"the checkpoint's cross-attention key {key} is not under lang_encoder.{layers_attr}: the checkpoint "
                "belongs to another language model family"
            )
        layers.add(int(m[2]))
    if not layers:
        raise ConversionError("the checkpoint holds no gated cross-attention layers: not an OpenFlamingo checkpoint?")
    if max(layers) >= num_layers:
        raise ConversionError(
            f"the checkpoint has a cross-attention block before decoder layer {max(layers)} but the language model "
            f"has {num_layers} layers: wrong --language-model?"
        )
    found = min(layers) + 1
    consistent = layers == {i for i in range(num_layers) if (i + 1) % found == 0}
    if requested is not None and (not consistent or found != requested):
        seen = f"every {found} layers" if consistent else f"before decoder layers {sorted(layers)}"
        raise ConversionError(
            f"wrong cross-attention interval: --cross-attn-every-n-layers is {requested} but the checkpoint has "
            f"cross-attention {seen}"
        )
    if not consistent:
        raise ConversionError(
            f"the checkpoint's cross-attention layers {sorted(layers)} do not follow a fixed interval"
        )
    return found


def _embedding_names(text_config) -> tuple[str, str | None]:
    """Names (relative to the causal LM) of its input embedding weight and of its separate output head's weight
    (None when the logits reuse the input embeddings: no head module, or a head tied to them)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(text_config)
    emb_weight = lm.get_input_embeddings().weight
    emb = next(n for n, p in lm.named_parameters(remove_duplicate=False) if p is emb_weight)
    head = lm.get_output_embeddings()
    if head is None or head.weight is emb_weight or getattr(text_config, "tie_word_embeddings", False):
        return emb, None
    out = next(n for n, m in lm.named_modules() if m is head)
    return emb, f"{out}.weight"


def _language_model_config(path: Path):
    """A transformers config from a (possibly remote-code) config.json, without running any code from it."""
    from transformers import CONFIG_MAPPING

    import modeling_flamingo  # noqa: F401  (registers `mosaic_gpt` with AutoConfig)

    data = read_json(path, "language model config")
    model_type = data.get("model_type")
    if not model_type:
        raise ConversionError(f"language model config {path} has no model_type")
    if model_type not in CONFIG_MAPPING:
        raise ConversionError(f"unsupported language model type {model_type!r} in {path}")
    for key in _DROPPED_LM_CONFIG_KEYS:
        data.pop(key, None)
    try:
        return CONFIG_MAPPING[model_type].from_dict(data)
    except Exception as exc:
        raise ConversionError(f"cannot read language model config {path}: {first_line(exc)}") from exc


def _decoder_layers_attr_name(text_config, path: Path) -> str:
    """Where the language model keeps its decoder layers, found on a weightless (meta-device) instance of it."""
    from modeling_flamingo.modeling_flamingo import _language_model_from_config, find_decoder_layers_attr_name

    try:
        with torch.device("meta"):
            return find_decoder_layers_attr_name(_language_model_from_config(text_config))
    except ValueError as exc:
        raise ConversionError(f"unsupported language model {text_config.model_type!r} in {path}: {exc}") from exc


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:
        # LLaMA folders converted with transformers 4.28 name the class `LLaMATokenizer`.
        config = folder / "tokenizer_config.json"
        if config.is_file() and str(read_json(config, "tokenizer config").get("tokenizer_class", "")).lower() in (
            "llamatokenizer",
            "llamatokenizerfast",
        ):
            from transformers import LlamaTokenizer

            with contextlib.suppress(Exception):
                return LlamaTokenizer.from_pretrained(str(folder))
        raise ConversionError(f"cannot load the tokenizer from {folder}: {first_line(exc)}") from exc


def _vision(src: Resolved, hidden_act: str):
    """(CLIPVisionConfig, weight source, kind) of an HF CLIP folder or an open_clip state-dict file."""
    from transformers import CLIPConfig, CLIPVisionConfig

    if src.path.is_dir():
        data = read_json(src.path / "config.json", "vision model config")
        model_type = data.get("model_type")
        try:
            if model_type == "clip":
                config = CLIPConfig.from_dict(data).vision_config
            elif model_type == "clip_vision_model":
                config = CLIPVisionConfig.from_dict(data)
            else:
                raise ConversionError(
                    f"vision model {src.path} is a {model_type!r} model; expected a CLIP model (model_type 'clip')"
                )
        except ConversionError:
            raise
        except Exception as exc:
            raise ConversionError(f"cannot read vision model config {src.path}: {first_line(exc)}") from exc
        return config, list(WeightFolder.find(src.path, "vision model file")), "hf"

    file = WeightFile(src.path, "vision file", nested=True)
    infos = file.infos()
    stripped = {strip_wrapper_prefixes(k): k for k in infos}
    if any(k.startswith("visual.") for k in stripped):
        keymap = {k[len("visual.") :]: s for k, s in stripped.items() if k.startswith("visual.")}
    else:
        keymap = stripped
    if "conv1.weight" not in keymap or "positional_embedding" not in keymap:
        raise ConversionError(
            f"vision file {src.path} is not an open_clip vision state dict (no conv1.weight / positional_embedding)"
        )
    conv = infos[keymap["conv1.weight"]].shape
    width, patch = conv[0], conv[-1]
    grid = math.isqrt(infos[keymap["positional_embedding"]].shape[0] - 1)
    blocks = {int(m[1]) for k in keymap if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))}
    fc = keymap.get("transformer.resblocks.0.mlp.c_fc.weight")
    if not blocks or fc is None or width % OPEN_CLIP_HEAD_WIDTH:
        raise ConversionError(f"vision file {src.path}: cannot read the architecture of the vision tower from it")
    proj = keymap.get("proj")
    config = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=infos[fc].shape[0],
        num_hidden_layers=max(blocks) + 1,
        num_attention_heads=width // OPEN_CLIP_HEAD_WIDTH,
        patch_size=patch,
        image_size=grid * patch,
        num_channels=conv[1],
        projection_dim=infos[proj].shape[1] if proj else 512,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
    )
    file.close()
    return config, (file, keymap), "open_clip"


def _flamingo_config(vision_config, text_config, every_n, media_id, eoc_id, ckpt_shapes, dtype):
    from modeling_flamingo.configuration.configuration_flamingo import FlamingoConfig

    frames = ckpt_shapes.get("perceiver.frame_embs")
    times = ckpt_shapes.get("perceiver.media_time_embs")
    try:
        config = FlamingoConfig(
            vision_config=vision_config.to_dict(),
            text_config=text_config.to_dict(),
            cross_attn_every_n_layers=every_n,
            media_token_id=media_id,
            eoc_token_id=eoc_id,
            max_num_frames=frames[0] if frames else None,
            max_num_media=times[0] if times else None,
        )
    except Exception as exc:
        raise ConversionError(f"cannot build the model config: {first_line(exc)}") from exc
    config.architectures = ["FlamingoForConditionalGeneration"]
    config.dtype = dtype
    config.vision_config.dtype = dtype
    config.text_config.dtype = dtype
    return config


def _meta_model(config):
    from modeling_flamingo.modeling_flamingo import FlamingoForConditionalGeneration

    with torch.device("meta"):
        return FlamingoForConditionalGeneration(config)


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's content, read in 8 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# writing


def _write(plan: _Plan, shards: dict, staging: Path, progress: bool | None, log, allow_non_finite: bool) -> None:
    from tqdm.auto import tqdm

    total = sum(t.nbytes for t in plan.tensors)
    log(f"writing {len(shards)} shard(s), {total / 1e9:.2f} GB")
    tracker = SourceTracker()
    disable = None if progress is None else not progress
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc="Converting", disable=disable) as bar:
            for name, tensors in shards.items():
                write_shard(staging / name, tensors, tracker, bar, allow_non_finite)
    finally:
        tracker.close()
    if len(shards) > 1:
        write_index(staging / SAFE_WEIGHTS_INDEX_NAME, shards, plan.total_parameters)


def _write_metadata(plan: _Plan, spec: ConversionSpec, shards: dict, staging: Path) -> None:
    from transformers import GenerationConfig

    from modeling_flamingo.processing import FlamingoImageProcessor, FlamingoProcessor

    from .model_card import input_record, model_card

    config = plan.config
    config.save_pretrained(staging)
    tokenizer = plan.tokenizer
    generation = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=config.eoc_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    generation.save_pretrained(staging)
    processor = FlamingoProcessor(
        image_processor=FlamingoImageProcessor.from_flamingo_config(config), tokenizer=tokenizer
    )
    processor.save_pretrained(staging)
    (staging / "README.md").write_text(model_card(plan, spec, shards), encoding="utf-8")
    # Last: the marker that makes the folder a conversion `--overwrite` may replace, with what it holds.
    files = sorted([p.name + ("/" if p.is_dir() else "") for p in staging.iterdir()] + [MARKER_NAME])
    marker = {"converter": CONVERTER_ID, "files": files, "inputs": input_record(plan)}
    (staging / MARKER_NAME).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")
