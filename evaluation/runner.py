"""The evaluation loop: plans, batches, streamed predictions, resume, multi-process gather, scores."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from modeling_flamingo.evaluation.arguments import EvalArguments, check_run_arguments, check_split_sizes
from modeling_flamingo.evaluation.data_dir import apply_data_dir
from modeling_flamingo.evaluation.datasets import EvalInputError, EvalItem
from modeling_flamingo.evaluation.eval_model import FlamingoEvalModel
from modeling_flamingo.evaluation.results import (
    OutputWriteError,
    atomic_write_text,
    merge_results,
    read_results,
    shot_summary,
    write_results,
)
from modeling_flamingo.evaluation.run_record import (
    build_record,
    check_output_paths,
    check_previous_run,
    merged_record,
    model_identity,
    output_paths,
    read_record,
    trial_file_name,
    write_record,
)
from modeling_flamingo.evaluation.sampling import PlannedItem, plan_trial, shard_batches
from modeling_flamingo.evaluation.tasks import TASKS, LoadedTask, TaskSpec
from modeling_flamingo.processing.processing_flamingo import MEDIA_TOKEN


class _SingleProcess:
    """What the runner uses of `accelerate.PartialState` when no launcher started several processes."""

    process_index = 0
    num_processes = 1
    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass


def _distributed_state():
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        # Without CUDA, `cpu=True` is what makes accelerate start a gloo process group instead of one process.
        return PartialState(cpu=not torch.cuda.is_available())
    return _SingleProcess()


def _gather(state, records: list[dict]) -> list[dict]:
    if state.num_processes == 1:
        return records
    from accelerate.utils import gather_object

    return gather_object(records)


def selected_tasks(args: EvalArguments) -> list[TaskSpec]:
    return [spec for spec in TASKS.values() if getattr(args, spec.flag)]


def predictions_dir(args: EvalArguments) -> Path:
    """`<results_file stem>/predictions` (next to the results file), or `./predictions` without a results file."""
    return output_paths(args.results_file)[2]


@dataclass
class RunProgress:
    """Where a run stands, for the message of an interrupted run: the trial being evaluated, the predictions file
    this process writes and the trial's number of items."""

    trial: str | None = None
    path: Path | None = None
    total: int = 0

    def saved(self) -> int:
        """The items whose predictions are complete in `path` (a line cut by the interruption does not count)."""
        return len(_read_records(self.path)) if self.path is not None else 0


# ---------------------------------------------------------------------------------------------------------------
# prompts


def build_prompt(
    spec: TaskSpec, loaded: LoadedTask, item: EvalItem, demos: Sequence[int], num_shots: int, zero_shot_images: str
) -> tuple[str, list[EvalItem]]:
    """(text, images) of one query with its demonstrations, as the original assembles them.

    At zero shots the demonstrations' text is kept without its `<image>` tags and their images are not passed,
    except in classification with `zero_shot_images="original"`, where, like the original, the two demonstration
    images are passed anyway (the query's `<image>` then attends to the first of them).
    """
    demo_items = [loaded.train[d] for d in demos]
    context = "".join(spec.demo_prompt(demo) + spec.demo_join for demo in demo_items)
    pass_demo_images = num_shots > 0 or (spec.zero_shot_demo_images and zero_shot_images == "original")
    if num_shots == 0:
        context = context.replace(MEDIA_TOKEN, "")
    images = (demo_items if pass_demo_images else []) + [item]
    return context + spec.query_prompt(item), images


# ---------------------------------------------------------------------------------------------------------------
# predictions files


def _read_records(path: Path) -> list[dict]:
    records = []
    if not path.is_file():
        return records
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # the line an interrupted run was writing
    return records


def _existing_records(final: Path) -> dict[str, dict]:
    records: dict[str, dict] = {}
    for path in [final, *sorted(final.parent.glob(final.name + ".rank*"))]:
        for record in _read_records(path):
            records[json.dumps(record["id"])] = record
    return records


def _id_key(item_id: Any) -> str:
    return json.dumps(item_id)


def _check_images(spec: TaskSpec, loaded: LoadedTask, plan: list[PlannedItem]) -> None:
    """Fail before any compute if an image the trial needs is missing (undecodable ones fail when loaded)."""
    for planned in plan:
        needed = [("test", loaded.test[planned.index])]
        needed += [("train", loaded.train[d]) for d in dict.fromkeys(d for o in planned.demos for d in o)]
        for split, item in needed:
            if not os.path.isfile(item.image_path):
                raise EvalInputError(
                    f"{spec.name} ({split} split) item {item.id!r}: image file {item.image_path} does not exist."
                )


# ---------------------------------------------------------------------------------------------------------------
# one trial


def evaluate_trial(
    spec: TaskSpec,
    loaded: LoadedTask,
    eval_model: FlamingoEvalModel,
    num_shots: int,
    seed: int,
    args: EvalArguments,
    state=None,
    retrieve: Callable[[list[int], int], list[list[int]]] | None = None,
    progress: RunProgress | None = None,
) -> float | None:
    """Evaluate one (task, shots, seed); returns the score on the main process (None elsewhere).

    Predictions stream to `<predictions dir>/<task>-<shots>shot-seed<seed>.jsonl` (one `.rank<r>` file per
    process when several run), are merged and scored at the end, and with `args.resume` finished items are read
    back instead of recomputed. `progress` is kept up to date with what is saved.
    """
    state = state or _SingleProcess()
    progress = progress or RunProgress()
    plan = plan_trial(
        len(loaded.test),
        len(loaded.train),
        seed,
        args.num_samples,
        args.query_set_size,
        num_shots,
        args.batch_size,
        prompt_ensembling=spec.prompt_ensembling and args.classification_prompt_ensembling,
        retrieve=retrieve,
    )
    _check_images(spec, loaded, plan)
    final = predictions_dir(args) / trial_file_name(spec.name, num_shots, seed)
    final.parent.mkdir(parents=True, exist_ok=True)
    done = _existing_records(final) if args.resume else {}
    for planned in plan:
        record = done.get(_id_key(loaded.test[planned.index].id))
        if record is not None and record["demo_ids"] != [[loaded.train[d].id for d in o] for o in planned.demos]:
            raise EvalInputError(
                f"--resume: {final} holds item {record['id']!r} with other demonstrations than this run draws; it was "
                "written with different settings (seed, shots, num_samples, query_set_size, batch_size, rices). "
                "Use another --results_file or remove that file."
            )
    label = f"{spec.name} {num_shots}-shot seed {seed}"
    reused = sum(_id_key(loaded.test[p.index].id) in done for p in plan)
    if args.resume and state.is_main_process:
        print(f"{label}: reused {reused} of {len(plan)} items from {final}", flush=True)
    state.wait_for_everyone()
    stream = final if state.num_processes == 1 else final.with_name(f"{final.name}.rank{state.process_index}")
    if not args.resume:
        # Our own output of an earlier run of the same trial: start it over.
        stream.unlink(missing_ok=True)
        if state.is_main_process:
            final.unlink(missing_ok=True)

    batches = shard_batches(plan, args.batch_size, state.process_index, state.num_processes)
    new_records: list[dict] = []
    context = f"{spec.name} (test split) "
    progress.trial, progress.path, progress.total = label, stream, len(plan)
    with open(stream, "a", encoding="utf-8") as out:
        for batch in tqdm(batches, desc=label, disable=not state.is_main_process, leave=False):
            todo = [p for p in batch if _id_key(loaded.test[p.index].id) not in done]
            if not todo:
                continue
            records = _run_batch(spec, loaded, eval_model, todo, num_shots, args, context)
            try:
                out.write("".join(json.dumps(record) + "\n" for record in records))
                out.flush()
            except OSError as err:
                raise OutputWriteError(
                    err.errno,
                    f"cannot write {stream}: {err.strerror or err}; the {progress.saved()} items saved before are "
                    "kept: make space and continue with --resume.",
                ) from err
            new_records.extend(records)

    gathered = _gather(state, new_records)
    if not state.is_main_process:
        return None
    by_id = dict(done)
    by_id.update({_id_key(r["id"]): r for r in gathered})
    ordered = [by_id[_id_key(loaded.test[p.index].id)] for p in plan]
    predictions = {r["id"]: spec.scored_prediction(r) for r in ordered}
    references = {r["id"]: loaded.references[r["id"]] for r in ordered}
    score, per_item = spec.score(predictions, references)
    for record in ordered:
        record["score"] = per_item[record["id"]]
    atomic_write_text(final, "".join(json.dumps(r) + "\n" for r in ordered))
    for part in final.parent.glob(final.name + ".rank*"):
        part.unlink()
    return float(score)


def _run_batch(
    spec: TaskSpec,
    loaded: LoadedTask,
    eval_model: FlamingoEvalModel,
    batch: list[PlannedItem],
    num_shots: int,
    args: EvalArguments,
    context: str,
) -> list[dict]:
    items = [loaded.test[p.index] for p in batch]
    zero_shot_images = args.zero_shot_classification_images
    prompts = [
        [build_prompt(spec, loaded, item, ordering, num_shots, zero_shot_images) for ordering in p.demos]
        for item, p in zip(items, batch, strict=True)
    ]
    outcomes = spec.predict(eval_model, prompts, args, context)
    return [
        _record(loaded, item, planned, item_prompts[0][0], outcome)
        for item, planned, item_prompts, outcome in zip(items, batch, prompts, outcomes, strict=True)
    ]


def _record(loaded: LoadedTask, item: EvalItem, planned: PlannedItem, prompt: str, outcome: dict) -> dict:
    """A predictions file line: the item, its demonstrations and prompt, the task's prediction, the references, and
    what else the task keeps of the prediction (`outcome` after its `prediction`)."""
    outcome = dict(outcome)
    return {
        "id": item.id,
        "demo_ids": [[loaded.train[d].id for d in ordering] for ordering in planned.demos],
        "prompt": prompt,
        "prediction": outcome.pop("prediction"),
        "references": loaded.references[item.id],
        **outcome,
    }


# ---------------------------------------------------------------------------------------------------------------
# the whole run


class _LazyImages(Sequence):
    """The images of a split, opened one at a time when indexed (RICES embeds them in batches)."""

    def __init__(self, items: Sequence[EvalItem], context: str):
        self.items, self.context = items, context

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index].load_image(self.context)


def rices_retriever(
    spec: TaskSpec, loaded: LoadedTask, args: EvalArguments, device=None
) -> Callable[[list[int], int], list[list[int]]]:
    """RICES over the train split: CLIP embeddings of every train image (read from, or written to,
    `<cached_demonstration_features>/<task>.pkl`, the original's file name), then per batch the k most similar
    train items of each query image, most similar last."""
    from modeling_flamingo.evaluation.rices import RICES, ClipImageEncoder

    encoder = ClipImageEncoder(args.rices_vision_encoder_path, device=device)
    cache_file = None
    if args.cached_demonstration_features:
        cache_file = Path(args.cached_demonstration_features) / f"{spec.name}.pkl"
        cache_file.parent.mkdir(parents=True, exist_ok=True)
    rices = RICES.from_images(
        _LazyImages(loaded.train, f"{spec.name} (train split) "),
        encoder,
        batch_size=args.batch_size,
        cache_file=cache_file,
        desc=f"RICES features of the {spec.name} train split",
    )
    test_images = _LazyImages(loaded.test, f"{spec.name} (test split) ")
    return lambda indices, k: rices.find([test_images[i] for i in indices], k)


def run_evaluation(
    args: EvalArguments | argparse.Namespace,
    eval_model: FlamingoEvalModel | None = None,
    progress: RunProgress | None = None,
) -> dict[str, list[dict]]:
    """Run every selected task, shot count and trial; write the results file (main process) and return the results
    (`{task: [{shots, trials, mean, stddev}]}` of this run, empty on the other processes).

    The results file keeps the (task, shots) entries of an earlier run made with the same model and settings that
    this run does not compute; `progress` follows the trial being evaluated (for an interruption's message).
    `args` come from `parse_arguments`, or as a namespace from `build_parser().parse_args` (a flag it lacks takes its
    default)."""
    if isinstance(args, argparse.Namespace):
        args = EvalArguments.from_namespace(args)
    check_run_arguments(args)
    args = apply_data_dir(args)
    tasks = selected_tasks(args)
    if not tasks:
        raise EvalInputError(
            "No task selected: pass at least one of " + ", ".join(f"--{s.flag}" for s in TASKS.values())
        )
    if len(args.trial_seeds) != args.num_trials:
        raise EvalInputError(
            f"--num_trials is {args.num_trials} but {len(args.trial_seeds)} --trial_seeds were given; give one seed per trial."
        )
    check_output_paths(args, tasks)
    # Read every annotation file, and check what each task's metric needs, before loading the model: bad input fails
    # in seconds, not after an hour of generation.
    loaded = {spec.name: spec.load(args) for spec in tasks}
    check_split_sizes(args, loaded)
    # So do the outputs of an earlier run this one would resume or sit beside (the model is compared once loaded).
    predictions = predictions_dir(args)
    record = build_record(args, tasks)
    previous = read_record(predictions)
    previous_results = read_results(args.results_file) if args.results_file else None
    check_previous_run(args, tasks, record, previous, previous_results, predictions)
    for spec in tasks:
        if spec.preflight is not None:
            spec.preflight()
    state = _distributed_state()
    if eval_model is None:
        device = None
        if args.device_map is None:
            device = state.device if state.num_processes > 1 else ("cuda" if torch.cuda.is_available() else "cpu")
        eval_model = FlamingoEvalModel.from_pretrained(
            args.model,
            args.precision,
            args.device_map,
            device=device,
            latents_cache_bytes=int(args.latents_cache_mb) << 20,
            class_batch_size=args.class_batch_size,
        )
    # The main process hashes a local model's files first; the others then find the hashes in the cache.
    if not state.is_main_process:
        state.wait_for_everyone()
    record["model"] = model_identity(eval_model.model.name_or_path)
    if state.is_main_process:
        state.wait_for_everyone()
    check_previous_run(args, tasks, record, previous, previous_results, predictions)
    if state.is_main_process:
        write_record(predictions, merged_record(previous, record))

    results: dict[str, list[dict]] = {}
    for spec in tasks:
        entries = []
        retrieve = rices_retriever(spec, loaded[spec.name], args, eval_model.device) if args.rices else None
        for num_shots in args.shots:
            trials = []
            for seed in args.trial_seeds:
                score = evaluate_trial(
                    spec, loaded[spec.name], eval_model, num_shots, seed, args, state, retrieve, progress
                )
                if state.is_main_process:
                    print(f"{spec.name} {num_shots}-shot seed {seed}: {score:.4f}", flush=True)
                trials.append(score)
            if state.is_main_process:
                entries.append(shot_summary(num_shots, trials))
        if state.is_main_process:
            results[spec.name] = entries
    if state.is_main_process and args.results_file:
        write_results(args.results_file, merge_results(previous_results, results))
    state.wait_for_everyone()
    return results
