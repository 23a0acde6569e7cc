"""`--data_dir`: dataset paths from one folder laid out like the hub dataset `openflamingo/eval_benchmark`.

The hub dataset holds the annotation files (one folder per benchmark); the image folders are not in it (their
archives were removed) and go beside them under the names below. A path flag given explicitly always wins. A hub
dataset id (`owner/name`) is fetched with `huggingface_hub.snapshot_download` (only the selected tasks' files; the
cache and `HF_HUB_OFFLINE` behave as for any hub download).
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

from modeling_flamingo.convert.sources import looks_like_repo_id
from modeling_flamingo.evaluation.datasets import EvalInputError
from modeling_flamingo.evaluation.tasks import TASKS

if TYPE_CHECKING:
    from modeling_flamingo.evaluation.arguments import EvalArguments

# flag -> path relative to the data dir, of every task (each task's `data_layout`).
DATA_DIR_LAYOUT: dict[str, str] = {flag: path for task in TASKS.values() for flag, path in task.data_layout.items()}


def resolve_data_dir(data_dir: str, folders: list[str]) -> str:
    """A local folder as is; a hub dataset id downloaded (the files of `folders` only) into the hub cache."""
    if os.path.isdir(data_dir):
        return data_dir
    if not looks_like_repo_id(data_dir):
        raise EvalInputError(f"--data_dir: {data_dir} is neither a folder nor a hub dataset id.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return snapshot_download(data_dir, repo_type="dataset", allow_patterns=[f"{folder}/*" for folder in folders])
    except (LocalEntryNotFoundError, HfHubHTTPError) as err:
        raise EvalInputError(f"--data_dir: cannot fetch the hub dataset {data_dir}: {err}") from err


def apply_data_dir(args: EvalArguments) -> EvalArguments:
    """`args` with every unset path flag of the selected tasks filled from `args.data_dir` (explicit flags are
    kept)."""
    if not args.data_dir:
        return args
    layout = {f: path for spec in TASKS.values() if getattr(args, spec.flag) for f, path in spec.data_layout.items()}
    folders = sorted({path.split("/")[0] for path in layout.values()})
    root = resolve_data_dir(args.data_dir, folders)
    filled = {flag: os.path.join(root, path) for flag, path in layout.items() if getattr(args, flag) is None}
    return dataclasses.replace(args, **filled)
