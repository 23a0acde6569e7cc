"""Streaming conversion of an original OpenFlamingo checkpoint into a transformers model folder.

The conversion never holds the model in memory:

1. Every input is opened lazily: `checkpoint.pt` and `.bin` files with `torch.load(weights_only=True, mmap=True)`,
   safetensors with `safe_open`. Only shapes are read while planning.
2. The config is assembled from the inputs (language model config.json read as JSON, embedding rows and the
   cross-attention interval read from the checkpoint, token ids from the tokenizer), and a `torch.device("meta")`
   instance of `FlamingoForConditionalGeneration` gives the expected names and shapes. Every missing, unexpected or
   mis-shaped tensor is reported before anything is written (`plan.py`, reading the inputs with `inputs.py`).
3. Output tensors are grouped by the input file they come from (checkpoint, vision tower, then each language model
   shard in turn), sharded in that order, and written slice by slice; each input is closed (unmapped) when the
   writer moves on to the next, so at most one input file's pages are resident at a time.
4. Everything is written into a temporary folder next to the target and renamed at the end; on any error the
   temporary folder is removed (`transaction.py`).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from modeling_flamingo.weight_dtypes import DTYPES

from .inputs import file_sha256
from .plan import ConversionPlan, ConversionSpec, plan_conversion
from .sources import ConversionError, HubOptions
from .transaction import (
    CONVERTER_ID,
    MARKER_NAME,
    ConversionTerminated,
    check_apart_from_inputs,
    check_output,
    conversion_files,
    previous_conversion_problem,
    remove_stale_leftovers,
    staging_folder,
)
from .writer import (
    SAFE_WEIGHTS_INDEX_NAME,
    SourceTracker,
    parse_shard_size,
    plan_shards,
    write_index,
    write_shard,
)


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
            folder is refused unless `overwrite` and it holds a previous conversion (see `previous_conversion_problem`).
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
    check_apart_from_inputs(output, [Path(p).expanduser() for p in local if p and os.path.exists(p)])
    check_output(output, overwrite)
    if spec.dtype not in DTYPES:
        raise ConversionError(f"unsupported dtype {spec.dtype!r}; choose from {', '.join(DTYPES)}")
    max_shard_size = parse_shard_size(spec.max_shard_size)

    with _quiet_transformers():
        plan = plan_conversion(spec, hub, log)
        check_apart_from_inputs(output, [src.path for src in plan.sources.values()])
        shards = plan_shards(plan.tensors, max_shard_size)
        with staging_folder(output, overwrite) as staging:
            _write(plan, shards, staging, progress, log, allow_non_finite)
            _write_metadata(plan, spec, shards, staging)
    log(f"wrote {output}")
    return output


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
# writing


def _write(
    plan: ConversionPlan, shards: dict, staging: Path, progress: bool | None, log, allow_non_finite: bool
) -> None:
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


def _write_metadata(plan: ConversionPlan, spec: ConversionSpec, shards: dict, staging: Path) -> None:
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


# Importable from here, where they were defined before the plan, the input readers and the output transaction had
# modules of their own.
__all__ = [
    "CONVERTER_ID",
    "DTYPES",
    "MARKER_NAME",
    "ConversionPlan",
    "ConversionSpec",
    "ConversionTerminated",
    "conversion_files",
    "convert",
    "file_sha256",
    "previous_conversion_problem",
    "remove_stale_leftovers",
]
