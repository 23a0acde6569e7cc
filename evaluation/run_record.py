"""What a run's predictions depend on, and the checks that keep one run's outputs from overwriting its inputs or
mixing with another run's.

A run writes `run_record.json` beside its predictions folder: the model's identity (a content hash of every file of a local
model folder, or the hub repo and its commit), the content hash of every annotation file it read, the flags that
change a prediction and the package version. `--resume`, and a run writing into a results file or predictions folder
that holds another run's outputs, compare it with this run's and refuse on a difference, naming it.

Hashes of large files are kept in `$HF_HOME/modeling_flamingo/file_hashes.json` keyed by the file's path, size,
modification and status-change times and inode: a file is hashed again only when one of these changes (any write or
replacement of the file changes its status-change time, which no tool can set back), so multi-GB weights are read
once, not on every run.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modeling_flamingo.convert.converter import file_sha256
from modeling_flamingo.evaluation.datasets import EvalInputError
from modeling_flamingo.evaluation.results import atomic_write_text, markdown_path

if TYPE_CHECKING:
    from modeling_flamingo.evaluation.arguments import EvalArguments

RECORD_NAME = "run_record.json"
RECORD_FORMAT = 1

# The flags every prediction depends on, besides the model and the data. `--batch_size` only changes the draw with
# classification prompt ensembling (elsewhere it only changes padding, which is masked), so it is recorded there only;
# `--latents_cache_mb`, `--class_batch_size` and `--device_map` change speed and memory, not what is computed.
PREDICTION_FLAGS = (
    "precision",
    "zero_shot_classification_images",
    "no_caching_for_classification",
    "classification_prompt_ensembling",
    "num_samples",
    "query_set_size",
    "rices",
)


# ---------------------------------------------------------------------------------------------------------------
# output paths


def output_paths(results_file: str | None) -> tuple[Path | None, Path | None, Path]:
    """(results JSON, its Markdown table, the predictions folder): `<stem>/predictions` beside the results file, or
    `./predictions` without one."""
    if not results_file:
        return None, None, Path("predictions")
    results = Path(results_file)
    return results, markdown_path(results), results.with_suffix("") / "predictions"


def _input_paths(args: EvalArguments, tasks: Sequence[Any]) -> list[tuple[str, str]]:
    """(flag, path) of every input this run reads: dataset paths, the data dir, a local model folder, the RICES cache."""
    inputs = [(flag, getattr(args, flag)) for spec in tasks for flag in spec.path_flags]
    inputs.append(("data_dir", args.data_dir))
    if args.model and os.path.exists(args.model):
        inputs.append(("model", args.model))
    if args.rices:
        inputs.append(("cached_demonstration_features", args.cached_demonstration_features))
    return [(flag, path) for flag, path in dict.fromkeys(inputs) if path and os.path.exists(path)]


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output_paths(args: EvalArguments, tasks: Sequence[Any]) -> None:
    """Refuse, before any work, output paths that cannot be written or that would overwrite an input.

    Raises:
        EvalInputError: a results file without an extension (its predictions folder would take its name), a
            results file or table that is a folder, a predictions folder below a file, or an output equal to or
            inside an input (symlinks resolved), or an input inside the predictions folder.
    """
    results, table, predictions = output_paths(args.results_file)
    if results is not None:
        if results.suffix == "":
            raise EvalInputError(
                f"--results_file {results} has no extension: its predictions go to the folder <stem>/predictions, "
                f"which would take the results file's own name; pass e.g. --results_file {results}.json."
            )
        for path in (results, table):
            if path.is_dir():
                raise EvalInputError(
                    f"--results_file: {path} is a folder; pass a file path, e.g. --results_file {results / 'results.json'}."
                )
    for parent in (predictions, *predictions.parents):
        if parent.exists() and not parent.is_dir():
            raise EvalInputError(
                f"--results_file: the predictions folder {predictions} cannot be made because {parent} is a file; "
                "pass a --results_file whose name without extension is not an existing file."
            )
    outputs = [("--results_file", results), ("its Markdown table", table), ("its predictions folder", predictions)]
    outputs = [(what, os.path.realpath(path)) for what, path in outputs if path is not None]
    for flag, path in _input_paths(args, tasks):
        real = os.path.realpath(path)
        for what, output in outputs:
            inside = _within(output, real) or (what == "its predictions folder" and _within(real, output))
            if inside:
                raise EvalInputError(
                    f"--results_file: {what} {output} would overwrite --{flag} {real} (an input); pass a "
                    "--results_file outside every input file and folder."
                )


# ---------------------------------------------------------------------------------------------------------------
# file hashes


def _hash_cache_file() -> Path:
    from modeling_flamingo.convert.hub import hf_home

    return hf_home() / "modeling_flamingo" / "file_hashes.json"


def _stat_key(stat: os.stat_result) -> list[int]:
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev]


def file_hashes(paths: Iterable[str | os.PathLike]) -> dict[str, str]:
    """{path: sha256 of its content}, read from the hash cache where the file's stat is unchanged."""
    cache_file = _hash_cache_file()
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    hashes, updated = {}, False
    for path in paths:
        real = os.path.realpath(path)
        key = _stat_key(os.stat(real))
        entry = cache.get(real)
        if not (isinstance(entry, dict) and entry.get("stat") == key):
            entry = cache[real] = {"stat": key, "sha256": file_sha256(real)}
            updated = True
        hashes[os.fspath(path)] = entry["sha256"]
    if updated:
        try:
            atomic_write_text(cache_file, json.dumps(cache, indent=0) + "\n")
        except OSError:
            pass  # only a speed-up: the next run hashes again
    return hashes


def model_identity(name_or_path: str) -> dict[str, Any]:
    """A local model folder: the sha256 of each of its files (config, weights, tokenizer, processor); a hub repo: its
    id and the commit the hub cache resolved (which fixes every file)."""
    if os.path.isdir(name_or_path):
        names = sorted(
            entry.name
            for entry in os.scandir(name_or_path)
            if entry.is_file() and not entry.name.startswith(".") and not entry.name.endswith(".lock")
        )
        hashes = file_hashes(os.path.join(name_or_path, name) for name in names)
        return {"folder": os.path.realpath(name_or_path), "files": dict(zip(names, hashes.values(), strict=True))}
    from modeling_flamingo.convert.hub import hub_cache_dir

    # from_pretrained has just resolved the repo into the hub cache: its `main` ref is the commit loaded. Read from the
    # ref, not from a file of the snapshot: an original release holds no config.json, only checkpoint.pt.
    ref = Path(hub_cache_dir()) / f"models--{name_or_path.replace('/', '--')}" / "refs" / "main"
    commit = ref.read_text(encoding="utf-8").strip() if ref.is_file() else ""
    return {"repo": name_or_path, "commit": commit or None}


# ---------------------------------------------------------------------------------------------------------------
# the record


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("openflamingo-transformers")
    except PackageNotFoundError:  # a source checkout on sys.path
        return "unknown"


def build_record(args: EvalArguments, tasks: Sequence[Any]) -> dict[str, Any]:
    """This run's record, without the model (added by `with_model` once it is loaded)."""
    settings = {flag: getattr(args, flag) for flag in PREDICTION_FLAGS}
    if settings["rices"]:
        settings["rices_vision_encoder_path"] = args.rices_vision_encoder_path
    if settings["classification_prompt_ensembling"]:
        settings["batch_size"] = args.batch_size
    data = {}
    for spec in tasks:
        files = {flag: getattr(args, flag) for flag in spec.path_flags if os.path.isfile(getattr(args, flag) or "")}
        hashes = file_hashes(files.values())
        data[spec.name] = {flag: {"path": path, "sha256": hashes[path]} for flag, path in files.items()}
    return {"format": RECORD_FORMAT, "package_version": _package_version(), "settings": settings, "data": data}


def record_path(predictions: Path) -> Path:
    """The run record, beside the predictions folder (which then holds only predictions files)."""
    return predictions.parent / RECORD_NAME


def read_record(predictions: Path) -> dict[str, Any] | None:
    path = record_path(predictions)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise EvalInputError(f"{path} is not a readable run record ({err}); move that folder away.") from err
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise EvalInputError(f"{path} is not a run record of this version; move that folder away.")
    return record


def _describe_model(identity: Mapping[str, Any]) -> str:
    if "repo" in identity:
        return f"{identity['repo']} at commit {identity['commit']}"
    return identity["folder"]


def _model_key(identity: Mapping[str, Any]) -> Any:
    """What identifies the weights: a folder's file contents (wherever it lies), or a repo's commit."""
    return identity.get("files", (identity.get("repo"), identity.get("commit")))


def differences(previous: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What `current` does differently from `previous` that changes predictions, one phrase each ("X, this run Y").
    Only what `current` holds is compared (its model once loaded, the data of the tasks both ran)."""
    found = []
    old, new = previous.get("model") or {}, current.get("model")
    if new is not None and _model_key(old) != _model_key(new):
        what = f"--model {_describe_model(old)}" if old else "an unrecorded model"
        detail = ""
        if "files" in old and "files" in new:
            changed = sorted(n for n in {**old["files"], **new["files"]} if old["files"].get(n) != new["files"].get(n))
            detail = f" (files that differ: {', '.join(changed)})"
        found.append(f"{what}, this run uses --model {_describe_model(new)}{detail}")
    old_settings = previous.get("settings", {})
    for flag in sorted(set(old_settings) | set(current["settings"])):
        old, new = old_settings.get(flag), current["settings"].get(flag)
        if old != new:
            found.append(f"--{flag} {old}, this run uses {new}")
    for task, files in current["data"].items():
        old_files = previous.get("data", {}).get(task)
        if old_files is None:
            continue
        for flag in sorted(set(old_files) | set(files)):
            old, new = (old_files.get(flag) or {}).get("sha256"), (files.get(flag) or {}).get("sha256")
            if old != new:
                where = (files.get(flag) or old_files[flag])["path"]
                found.append(f"other content in --{flag} than this run's {where} ({task})")
    if previous.get("package_version") != current["package_version"]:
        found.append(
            f"openflamingo-transformers {previous.get('package_version')}, this run uses {current['package_version']}"
        )
    return found


def merged_record(previous: Mapping[str, Any] | None, current: Mapping[str, Any]) -> dict[str, Any]:
    """The record to write: this run's, keeping the data identity of an earlier run's other tasks when it was made
    with the same model and settings (their results are kept beside this run's)."""
    kept = previous is not None and not differences(previous, current)
    data = {**(previous["data"] if kept else {}), **current["data"]}
    return {**current, "data": data}


def write_record(predictions: Path, record: Mapping[str, Any]) -> None:
    atomic_write_text(record_path(predictions), json.dumps(record, indent=2) + "\n")


def trial_file_name(task: str, shots: int, seed: int) -> str:
    """The predictions file of one trial."""
    return f"{task}-{shots}shot-seed{seed}.jsonl"


def check_previous_run(
    args: EvalArguments,
    tasks: Sequence[Any],
    record: Mapping[str, Any],
    previous: Mapping[str, Any] | None,
    previous_results: Mapping[str, list[Mapping[str, Any]]] | None,
    predictions: Path,
) -> None:
    """Refuse to mix this run's predictions or results with another run's.

    With `--resume`, any difference between the predictions' record and this run is refused. Without it, this run
    replaces the trial files and (task, shots) results it computes; an earlier run's other files and results would be
    kept beside them, so a difference (or no record at all) is refused then.

    Raises:
        EvalInputError: naming the difference and the outputs that would be mixed.
    """
    found = differences(previous, record) if previous is not None else []
    if args.resume:
        if previous is None and "model" not in record and any(predictions.glob("*.jsonl*")):
            print(
                f"warning: --resume: {predictions} has no run record {record_path(predictions)} (written by an "
                "earlier version): its "
                "predictions are reused without checking the model and settings they were made with.",
                file=sys.stderr,
            )
        if found:
            raise EvalInputError(
                f"--resume: the predictions in {predictions} were made with different settings: "
                + "; ".join(found)
                + ". Resume with the earlier settings, or start a new run with another --results_file."
            )
        return
    planned_files = {trial_file_name(s.name, n, seed) for s in tasks for n in args.shots for seed in args.trial_seeds}
    kept_files = sorted(
        p.name
        for p in predictions.glob("*.jsonl*")
        if p.name.split(".jsonl")[0] + ".jsonl" not in planned_files and p.is_file()
    )
    planned = {(s.name, n) for s in tasks for n in args.shots}
    kept_results = [
        f"{task} {e['shots']}-shot"
        for task, entries in (previous_results or {}).items()
        for e in entries
        if (task, e["shots"]) not in planned
    ]
    if not kept_files and not kept_results:
        return  # this run replaces everything an earlier run left
    if previous is None:
        found = [f"settings that were not recorded (no {record_path(predictions)})"]
    if found:
        kept = []
        if kept_results:
            kept.append(f"results {', '.join(kept_results)} in {args.results_file}")
        if kept_files:
            kept.append(f"predictions {', '.join(kept_files[:4])}{' ...' if len(kept_files) > 4 else ''}")
        raise EvalInputError(
            f"--results_file: the earlier run's {' and '.join(kept)} were made with {'; '.join(found)}: "
            "this run would mix with them (or drop them). Pass another --results_file, or move those files away."
        )
