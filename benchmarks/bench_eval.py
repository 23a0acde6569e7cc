"""Few-shot evaluation, original harness vs ours on the same weights and data: items/s, predictions and scores.

Run from the repository root in the test environment (it needs the original, `open-flamingo`, installed as
`tests/run.sh` installs it, and java for the CIDEr scores):

    .venv-test/bin/python benchmarks/bench_eval.py --wait-quiet 600          # both parts, scaled-down 9B, CPU, fp32
    .venv-test/bin/python benchmarks/bench_eval.py --tasks captioning        # COCO captioning at 4 and 32 shots
    .venv-test/bin/python benchmarks/bench_eval.py --tasks classification    # Hateful Memes and ImageNet, 4 shots
    .venv-test/bin/python benchmarks/bench_eval.py --device cuda             # both models on the GPU

- Models: `bench_generation.build_pair("scaled9b")`, the original and ours on the same random weights. Its
  tokenizer is the tests' tiny byte-level BPE with the caption words and filler tokens added until it has the 9B's
  50,280 + 3 tokens, so every token id the random model generates decodes to text (with the bare tiny tokenizer,
  ids beyond its 323 tokens decode to nothing and the predictions would be empty, and trivially equal).
- Data: `tests/eval_data.make_coco`, a COCO Karpathy-layout folder of random JPEGs and five-word captions.
- Original: `open_flamingo.eval.evaluate.evaluate_captioning` on the original model wrapped in
  `tests/reference_eval.OriginalEvalModel` (the repository's `eval/models/open_flamingo.py` prompts and calls).
- Ours: `modeling_flamingo.evaluation.runner.run_evaluation` with the CLI's parsed flags (`--eval_coco --shots k
  --trial_seeds s ...`) on a `FlamingoEvalModel` of our model; a fresh one (empty image-latents cache) every run.
- Same protocol for both: seed, test subset, query set, batch size, beam search (3 beams, length penalty 0, 20 new
  tokens at most), CIDEr post-processing.
- Classification: `evaluate_classification` of the original on its cached path (its default) and ours through
  `run_evaluation` (`--eval_hateful_memes`, `--eval_imagenet` with all 1,000 class names), 8 test items at batch 8,
  4 shots. Each ranking call's prompts and (B, C) class log-likelihoods are recorded on both sides and compared item
  by item and class by class (1e-4), with the ROC AUC / top-1 accuracy of each. The data are written so that the
  prompts of a batch have the same length (see `make_classification_data`): the original's cached path attends to
  left padding.

`--device` (cpu by default): where both models run, the same weights moved there (the original's inputs through
`OriginalEvalModel(device=...)`, ours through `FlamingoEvalModel`, which follows the model); on a GPU every clock
(the trial's and the forward hooks') is read after `torch.cuda.synchronize()`.

Timed: one whole trial call (annotations read, sampling, image loading and preprocessing, generation, predictions
written), best of N, the implementations alternating. Not timed: building the models and data, and CIDEr, which both
would pay the same (the stand-ins record the predictions instead); the CIDEr of each harness's predictions is
computed afterwards, the original's through its pycocoevalcap path, ours through `evaluation.metrics`.

Forward hooks on the vision tower, the resampler and the language model (a few microseconds per model call, in
every timed run) split the best run's time: images through the vision tower and resampler (and how many), the
language model's prefill and decoding steps, and the rest (data, image preprocessing, beam-search bookkeeping).

It prints markdown tables and writes them, with the machine, its load average (`benchmarks/_machine.py`: read at the
start of the run, before the models are built, and at the end of each part; a warning, or with `--wait-quiet SECONDS`
a bounded wait, when the machine is busy at the start) and versions, to `benchmarks/RESULTS.md` (or
`--out`), replacing its own sections there (one per part) and keeping the others.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import operator
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from unittest import mock

import torch
from tokenizers import AddedToken

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _machine import MachineLoad, add_load_arguments, check_load  # noqa: E402
from bench_generation import SIZES, VOCAB_9B, build_pair, write_results_section  # noqa: E402
from eval_data import WORDS, make_coco, make_hateful_memes, make_imagenet  # noqa: E402
from reference_eval import (  # noqa: E402
    OriginalEvalModel,
    _cider_only,
    init_single_process_group,
    load_original_evaluate,
    original_args,
    with_imagenet_ocr_fix,
)

from modeling_flamingo import FlamingoProcessor  # noqa: E402
from modeling_flamingo.evaluation import metrics  # noqa: E402
from modeling_flamingo.evaluation.__main__ import build_parser  # noqa: E402
from modeling_flamingo.evaluation.classnames import HATEFUL_MEMES_CLASSNAMES, IMAGENET_CLASSNAMES  # noqa: E402
from modeling_flamingo.evaluation.eval_model import FlamingoEvalModel  # noqa: E402
from modeling_flamingo.evaluation.runner import run_evaluation  # noqa: E402
from modeling_flamingo.evaluation.tasks import TASKS, TaskSpec  # noqa: E402
from modeling_flamingo.processing.image_processing_flamingo import FlamingoImageProcessor  # noqa: E402
from modeling_flamingo.testing import make_tiny_tokenizer  # noqa: E402

import reference  # noqa: E402

FLAMINGO_TOKENS = 3  # <|endofchunk|>, <image>, <PAD>: added by the original's create_model_and_transforms
SECTION = "## Evaluation: captioning"
CLASSIFICATION_SECTION = "## Evaluation: classification"
CLASSIFICATION_TASKS = ("hateful_memes", "imagenet")
TOL = 1e-4  # class log-likelihoods, ours against the original's


def full_vocab_tokenizer(bos_token: str | None = None):
    """The tests' tiny tokenizer grown to the 9B's vocabulary: the caption words as whole tokens (captions then
    tokenize about one token per word, as with the 9B's GPT-NeoX tokenizer), the words of the class names as whole
    words (ImageNet's 1,000 names then take 1.8 tokens each on average, instead of 8.8 byte-level pieces; "yes" and
    "no" one each), then `" t<i>"` filler tokens."""
    tokenizer = make_tiny_tokenizer(bos_token=bos_token)
    tokenizer.add_tokens([f" {word}" for word in WORDS])
    names = [*IMAGENET_CLASSNAMES, *HATEFUL_MEMES_CLASSNAMES]
    class_words = sorted({word for name in names for word in re.findall(r"[A-Za-z]+", name)} - set(WORDS))
    tokenizer.add_tokens([AddedToken(word, single_word=True, lstrip=True) for word in class_words])
    tokenizer.add_tokens([f" t{i}" for i in range(VOCAB_9B - FLAMINGO_TOKENS - len(tokenizer))])
    assert len(tokenizer) == VOCAB_9B - FLAMINGO_TOKENS, len(tokenizer)
    return tokenizer


def build_models(size: str):
    """(original, ours, tokenizer) on the same weights; the original factory then adds the Flamingo tokens."""
    with mock.patch.object(reference, "make_tiny_tokenizer", full_vocab_tokenizer):
        original, ours, tokenizer = build_pair(size)
    assert len(tokenizer) == VOCAB_9B == ours.config.text_config.vocab_size
    return original.eval(), ours.eval(), tokenizer


# ---------------------------------------------------------------------------------------------------------------
# the two harnesses


class OriginalHarness:
    """`evaluate_captioning` of the original; its `compute_cider` replaced by a recorder of the results file."""

    def __init__(self, original, tokenizer, image_size: int, paths: dict, workdir: Path, **common):
        self.evaluate = load_original_evaluate()
        self.eval_model = OriginalEvalModel(original, tokenizer, image_size=image_size, device=_device(original))
        self.paths, self.common, self.workdir = paths, common, workdir
        self.predictions: dict = {}

    def _record(self, result_path: str, annotations_path: str) -> dict:
        self.predictions = {r["image_id"]: r["caption"] for r in json.loads(Path(result_path).read_text())}
        return {"CIDEr": 0.0}

    def run(self, shots: int, seed: int) -> dict:
        args = original_args(**self.paths, **self.common)  # (re-imports evaluate.py's CIDEr-only stand-in)
        self.evaluate.compute_cider = self._record
        self.predictions = {}
        with contextlib.chdir(self.workdir):  # the original writes its results file to the working directory
            self.evaluate.evaluate_captioning(
                args,
                self.eval_model,
                seed=seed,
                num_shots=shots,
                dataset_name="coco",
            )
        if not self.predictions:
            raise RuntimeError("the original harness wrote no predictions")
        return self.predictions

    def cider(self, predictions: dict) -> float:
        """The original's own scoring path (pycocoevalcap on a results file), as `evaluate_captioning` ends."""
        path = self.workdir / "original-results.json"
        path.write_text(json.dumps([{"image_id": k, "caption": v} for k, v in predictions.items()]))
        return _cider_only(str(path), self.paths["coco_annotations_json_path"])["CIDEr"] * 100.0


class OurHarness:
    """`run_evaluation` on the CLI's flags; a fresh `FlamingoEvalModel` (empty latents cache) for every run."""

    def __init__(self, ours, tokenizer, paths: dict, workdir: Path, num_samples, query_set_size, batch_size):
        self.model = ours
        self.processor = FlamingoProcessor(FlamingoImageProcessor.from_flamingo_config(ours.config), tokenizer)
        self.paths, self.workdir = paths, workdir
        self.flags = [f"--num_samples={num_samples}", f"--query_set_size={query_set_size}"]
        self.flags += [f"--batch_size={batch_size}"]

    def run(self, shots: int, seed: int) -> dict:
        results_file = self.workdir / "ours.json"
        argv = ["--model", "unused", "--eval_coco", "--shots", str(shots), "--trial_seeds", str(seed)]
        argv += ["--results_file", str(results_file), *self.flags]
        argv += [part for flag, value in self.paths.items() for part in (f"--{flag}", value)]
        args = build_parser().parse_args(argv)
        eval_model = FlamingoEvalModel(self.model, self.processor)
        with (
            mock.patch.object(TaskSpec, "score", _unscored),
            contextlib.redirect_stdout(open(os.devnull, "w")),  # noqa: SIM115  (its per-trial score line)
        ):
            run_evaluation(args, eval_model=eval_model)
        lines = (results_file.with_suffix("") / "predictions" / f"coco-{shots}shot-seed{seed}.jsonl").read_text()
        return {r["id"]: r["prediction"] for r in map(json.loads, lines.splitlines())}

    def cider(self, predictions: dict) -> float:
        from modeling_flamingo.evaluation.datasets import read_coco_style_references

        references = read_coco_style_references(self.paths["coco_annotations_json_path"], "coco_annotations_json_path")
        return metrics.cider(predictions, {k: references[k] for k in predictions})


def _unscored(self, predictions, references):
    return 0.0, dict.fromkeys(predictions, 0.0)


# ---------------------------------------------------------------------------------------------------------------
# classification


def make_classification_data(root: Path, task: str, num_samples: int, query_set_size: int) -> dict[str, str]:
    """The task's data in its real layout, written so that every prompt of a batch has the same number of tokens.

    The original's cached path feeds class-name tokens without an attention mask, so in a left-padded batch they
    attend to the padding (docs/evaluation.md); only without padding are its log-likelihoods comparable with ours.
    Hateful Memes: every OCR text is "meme" and the writer's four words (one token each), and "yes"/"no" are one token
    each. ImageNet: the query set is one class's training images (every demonstration reads "tench"), the test items
    one validation image of each of the first `num_samples` classes.
    """
    if task == "hateful_memes":
        paths = make_hateful_memes(root, num_train=query_set_size, num_test=num_samples)
        for flag in ("hateful_memes_train_annotations_json_path", "hateful_memes_test_annotations_json_path"):
            path = Path(paths[flag])
            memes = [json.loads(line) for line in path.read_text().splitlines()]
            path.write_text("".join(json.dumps({**meme, "text": f"meme {meme['text']}"}) + "\n" for meme in memes))
        return paths
    make_imagenet(root, num_classes=1, per_class=(query_set_size, 0))
    return make_imagenet(root, num_classes=num_samples, per_class=(0, 1))


class Ranking:
    """What one classification trial computed: each ranked prompt, its (C,) class log-likelihoods, and the score.

    Args:
        prompts: the N prompts, in ranking order.
        scores: (N, C) float32 class log-likelihoods, rows in ranking order.
        score: ROC AUC (Hateful Memes) or top-1 accuracy (ImageNet).
    """

    def __init__(self, prompts: list[str], scores: torch.Tensor, score: float):
        self.prompts, self.scores, self.score = prompts, scores, score

    def __eq__(self, other) -> bool:
        return self.prompts == other.prompts and torch.equal(self.scores, other.scores) and self.score == other.score


class _Patches:
    """`monkeypatch.setattr` on an ExitStack of `mock.patch.object`, for `reference_eval.with_imagenet_ocr_fix`."""

    def __init__(self, stack: contextlib.ExitStack):
        self.stack = stack

    def setattr(self, target, name: str, value) -> None:
        self.stack.enter_context(mock.patch.object(target, name, value))


class OriginalClassifier:
    """`evaluate_classification` of the original on its cached path (`no_kv_caching=False`, the default of its
    `--no_caching_for_classification`), every `get_rank_classifications` call's prompts and scores recorded."""

    def __init__(self, original, tokenizer, image_size: int, task: str, class_names, paths: dict, **common):
        self.evaluate = load_original_evaluate()
        self.eval_model = OriginalEvalModel(original, tokenizer, image_size=image_size, device=_device(original))
        self.task, self.class_names, self.paths, self.common = task, list(class_names), paths, common

    def run(self, shots: int, seed: int) -> Ranking:
        calls = []
        inner = self.eval_model.get_rank_classifications

        def recording(batch_text, batch_images, *args, **kwargs):
            out = inner(batch_text, batch_images, *args, **kwargs)
            calls.append((list(batch_text), out.float()))
            return out

        args = original_args(**self.paths, **self.common)
        with contextlib.ExitStack() as stack:
            stack.enter_context(mock.patch.object(self.eval_model, "get_rank_classifications", recording))
            stack.enter_context(mock.patch.object(self.evaluate, "IMAGENET_CLASSNAMES", self.class_names))
            with_imagenet_ocr_fix(self.evaluate, _Patches(stack))
            score = self.evaluate.evaluate_classification(
                args, self.eval_model, seed=seed, num_shots=shots, dataset_name=self.task
            )
        return Ranking([t for text, _ in calls for t in text], torch.cat([out for _, out in calls]), float(score))


class OurClassifier:
    """`run_evaluation` on the CLI's flags (`--eval_<task>`, cached context as by default); a fresh
    `FlamingoEvalModel` (empty caches) for every run, every `rank_classifications` call's prompts and scores
    recorded."""

    def __init__(self, ours, tokenizer, task: str, class_names, paths: dict, workdir: Path, **common):
        self.model = ours
        self.processor = FlamingoProcessor(FlamingoImageProcessor.from_flamingo_config(ours.config), tokenizer)
        self.task, self.class_names, self.paths, self.workdir = task, tuple(class_names), paths, workdir
        self.flags = [f"--{flag}={value}" for flag, value in common.items()]

    def run(self, shots: int, seed: int) -> Ranking:
        calls = []
        inner = FlamingoEvalModel.rank_classifications

        def recording(eval_model, batch_text, batch_images, *args, **kwargs):
            out = inner(eval_model, batch_text, batch_images, *args, **kwargs)
            calls.append((list(batch_text), out.float()))
            return out

        argv = ["--model", "unused", f"--eval_{self.task}", "--shots", str(shots), "--trial_seeds", str(seed)]
        argv += ["--results_file", str(self.workdir / f"ours-{self.task}.json"), *self.flags]
        argv += [part for flag, value in self.paths.items() for part in (f"--{flag}", value)]
        args = build_parser().parse_args(argv)
        spec = dataclasses.replace(TASKS[self.task], class_names=self.class_names)
        with (
            mock.patch.object(FlamingoEvalModel, "rank_classifications", recording),
            mock.patch.dict(TASKS, {self.task: spec}),
            contextlib.redirect_stdout(open(os.devnull, "w")),  # noqa: SIM115  (its per-trial score line)
        ):
            results = run_evaluation(args, eval_model=FlamingoEvalModel(self.model, self.processor))
        score = results[self.task][0]["trials"][0]
        return Ranking([t for text, _ in calls for t in text], torch.cat([out for _, out in calls]), float(score))


def check_unpadded(tokenizer, prompts: list[str], batch_size: int) -> None:
    """Refuse a comparison the original's cached path cannot pass: prompts of one batch with different lengths."""
    for start in range(0, len(prompts), batch_size):
        lengths = {len(tokenizer(p)["input_ids"]) for p in prompts[start : start + batch_size]}
        if len(lengths) > 1:
            raise RuntimeError(
                f"prompts of one batch have {sorted(lengths)} tokens: the original's cached path would attend to the "
                "left padding (docs/evaluation.md), so its log-likelihoods could not be compared with ours."
            )


def measure_classification(
    task: str, args, original, ours, tokenizer, image_size: int, tmp: Path
) -> tuple[str, list[str], str | None]:
    """One task's row, its two time-split rows, and a note when the scores differ."""
    class_names = HATEFUL_MEMES_CLASSNAMES if task == "hateful_memes" else IMAGENET_CLASSNAMES[: args.imagenet_classes]
    n, shots = args.classification_samples, args.classification_shots
    paths = make_classification_data(tmp / task, task, n, args.query_set_size)
    common = dict(num_samples=n, query_set_size=args.query_set_size, batch_size=args.batch_size)
    (tmp / task / "ours").mkdir()
    harnesses = {
        "original": OriginalClassifier(original, tokenizer, image_size, task, class_names, paths, **common),
        "ours": OurClassifier(ours, tokenizer, task, class_names, paths, tmp / task / "ours", **common),
    }
    models = {"original": original, "ours": ours}
    res = measure_cell(harnesses, models, shots, args.seed, args.repeats, _context_or_classes)
    o, u = res["original"]["predictions"], res["ours"]["predictions"]
    if o.prompts != u.prompts:
        raise RuntimeError(f"{task}: the two harnesses ranked different prompts")
    check_unpadded(tokenizer, o.prompts, args.batch_size)
    diff = (o.scores - u.scores).abs().max().item()
    same = diff <= TOL and o.score == u.score
    class_tokens = statistics.mean(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in class_names)
    prompt_len = statistics.mean(len(tokenizer(p)["input_ids"]) for p in o.prompts)
    so, su = res["original"]["seconds"], res["ours"]["seconds"]
    row = (
        f"| {task} | {len(class_names)} | {class_tokens:.1f} | {shots} | {args.batch_size} | {len(o.prompts)} "
        f"| {prompt_len:.0f} | {so:.1f} | {su:.1f} | {len(o.prompts) / so:.3f} | {len(o.prompts) / su:.3f} "
        f"| **{so / su:.2f}x** | {diff:.1e} | {'yes' if same else 'NO'} | {o.score:.4f} | {u.score:.4f} |"
    )
    split_rows = []
    for name in ("original", "ours"):
        split, total = res[name]["split"], res[name]["seconds"]
        sec = split.seconds
        split_rows.append(
            f"| {task} | {name} | {total:.1f} | {split.images} | {sec['vision']:.1f} | {sec.get('context', 0.0):.1f} "
            f"| {sec.get('classes', 0.0):.1f} | {total - sum(sec.values()):.1f} |"
        )
    note = None
    if not same:
        note = f"{task}: log-likelihoods differ by up to {diff:.1e} (tolerance {TOL}), scores {o.score} and {u.score}"
    return row, split_rows, note


# ---------------------------------------------------------------------------------------------------------------
# where the time goes


class Breakdown:
    """Seconds spent in the vision tower + resampler and in the language model, its calls split by `lm_kind(args,
    kwargs)` (captioning: prefill, calls with more than one new token, and decoding steps; classification: the
    context, calls without a cache, and the class names, calls continuing from one), from forward hooks; and how
    many images went through the vision tower."""

    def __init__(self, model, lm_kind: Callable[[tuple, dict], str] | None = None):
        self.model = model
        self.lm_kind = lm_kind or _prefill_or_decode
        self.seconds: dict[str, float] = {"vision": 0.0}
        self.images = 0
        self._start: dict[int, float] = {}
        self.device = _device(model)

    def _timed(self, module, kind: Callable[[tuple, dict], str]):
        def pre(mod, args, kwargs):
            self._start[id(mod)] = now(self.device)

        def post(mod, args, kwargs, out):
            key = kind(args, kwargs)
            self.seconds[key] = self.seconds.get(key, 0.0) + now(self.device) - self._start.pop(id(mod))

        return [
            module.register_forward_pre_hook(pre, with_kwargs=True),
            module.register_forward_hook(post, with_kwargs=True),
        ]

    def __enter__(self):
        vision, perceiver = self.model.vision_encoder, self.model.perceiver
        lm = getattr(self.model, "lang_encoder", None) or self.model.language_model
        self.handles = self._timed(vision, lambda a, k: "vision") + self._timed(perceiver, lambda a, k: "vision")
        self.handles += self._timed(lm, self.lm_kind)

        def count(mod, args, kwargs):
            pixels = args[0] if args else kwargs["pixel_values"]
            self.images += pixels.shape[0]

        self.handles.append(vision.register_forward_pre_hook(count, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def _device(model) -> torch.device:
    return next(model.parameters()).device


def now(device: torch.device) -> float:
    """`time.perf_counter()` once the work queued on `device` is done (a CUDA device runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _prefill_or_decode(args: tuple, kwargs: dict) -> str:
    return "prefill" if _new_tokens(args, kwargs) > 1 else "decode"


def _context_or_classes(args: tuple, kwargs: dict) -> str:
    past = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5.25 renamed it `cache`
    cached = past is not None and (past.get_seq_length() if hasattr(past, "get_seq_length") else len(past)) > 0
    return "classes" if cached else "context"


def _new_tokens(args: tuple, kwargs: dict) -> int:
    for value in (*args, kwargs.get("input_ids"), kwargs.get("inputs_embeds")):
        if isinstance(value, torch.Tensor):
            return value.shape[1]
    raise ValueError("language model called without input_ids or inputs_embeds")


# ---------------------------------------------------------------------------------------------------------------
# the run


def measure_cell(
    harnesses: dict,
    models: dict,
    shots: int,
    seed: int,
    repeats: int,
    lm_kind: Callable[[tuple, dict], str] | None = None,
    same: Callable = operator.eq,
) -> dict:
    """Best-of-`repeats` seconds of one trial for every harness, alternating; the `Breakdown` of that best run and
    each harness's predictions (which must not change between repeats: `same(previous, new)`)."""
    res = {name: {"seconds": float("inf")} for name in harnesses}
    for _ in range(repeats):
        for name, harness in harnesses.items():
            with Breakdown(models[name], lm_kind) as split:
                start = now(split.device)
                predictions = harness.run(shots, seed)
                elapsed = now(split.device) - start
            if elapsed < res[name]["seconds"]:
                res[name].update(seconds=elapsed, split=split)
            if "predictions" in res[name] and not same(res[name]["predictions"], predictions):
                raise RuntimeError(f"{name}: predictions changed between repeats at {shots} shots")
            res[name]["predictions"] = predictions
    return res


def prompt_tokens(tokenizer, harness: OurHarness, shots: int, seed: int) -> float:
    """Mean prompt length in tokens of the trial's items, read back from our predictions file."""
    path = harness.workdir / "ours" / "predictions" / f"coco-{shots}shot-seed{seed}.jsonl"
    prompts = [json.loads(line)["prompt"] for line in path.read_text().splitlines()]
    return statistics.mean(len(tokenizer(p)["input_ids"]) for p in prompts)


def differences(original: dict, ours: dict) -> list[str]:
    ids = sorted(set(original) | set(ours), key=str)
    return [f"{i}: original {original.get(i)!r}, ours {ours.get(i)!r}" for i in ids if original.get(i) != ours.get(i)]


def versions() -> str:
    return (
        f"torch {torch.__version__}, transformers {version('transformers')}, open-flamingo {version('open-flamingo')}, "
        f"open_clip {version('open_clip_torch')}"
    )


def machine(load: MachineLoad, device: torch.device) -> str:
    gpu = f"{torch.cuda.get_device_name(device)}; " if device.type == "cuda" else ""
    cpu = f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}"
    return f"{gpu}{cpu}, {load.describe()}"


def run_captioning(args, original, ours, tokenizer, image_size: int, tmp: Path, load: MachineLoad) -> str:
    """The captioning cells; returns the results section."""
    rows, split_rows, notes = [], [], []
    paths = make_coco(tmp / "data", num_train=args.query_set_size + 16, num_test=args.num_samples)
    common = dict(num_samples=args.num_samples, query_set_size=args.query_set_size, batch_size=args.batch_size)
    (tmp / "original").mkdir()
    models = {"original": original, "ours": ours}
    harnesses = {
        "original": OriginalHarness(original, tokenizer, image_size, paths, tmp / "original", **common),
        "ours": OurHarness(ours, tokenizer, paths, tmp, **common),
    }
    for shots in args.shots:
        res = measure_cell(harnesses, models, shots, args.seed, args.repeats)
        o, u = res["original"], res["ours"]
        diff = differences(o["predictions"], u["predictions"])
        ciders = {name: harnesses[name].cider(r["predictions"]) for name, r in res.items()}
        n = len(u["predictions"])
        tokens = prompt_tokens(tokenizer, harnesses["ours"], shots, args.seed)
        rows.append(
            f"| {shots} | {args.batch_size} | {n} | {tokens:.0f} | {o['seconds']:.1f} | {u['seconds']:.1f} "
            f"| {n / o['seconds']:.2f} | {n / u['seconds']:.2f} | **{o['seconds'] / u['seconds']:.2f}x** "
            f"| {'yes' if not diff else f'NO ({len(diff)} of {n})'} | {ciders['original']:.2f} "
            f"| {ciders['ours']:.2f} |"
        )
        print(rows[-1], flush=True)
        if diff:
            notes.append(f"{shots} shots, differing predictions:\n\n" + "\n".join(f"- {d}" for d in diff))
            print("\n".join(diff), file=sys.stderr)
        for name in ("original", "ours"):
            split, total = res[name]["split"], res[name]["seconds"]
            seconds = split.seconds
            split_rows.append(
                f"| {shots} | {name} | {total:.1f} | {split.images} | {seconds['vision']:.1f} "
                f"| {seconds.get('prefill', 0.0):.1f} | {seconds.get('decode', 0.0):.1f} "
                f"| {total - sum(seconds.values()):.1f} |"
            )
            print(split_rows[-1], flush=True)
    load.finish()
    s = SIZES[args.size]
    text = (
        f"{SECTION} `{args.size}` ({args.device}, fp32)\n\n"
        f"Model: as the generation benchmark's `{args.size}` (MPT LM {s['lm_width']} wide x {s['lm_layers']} layers, "
        f"CLIP {s['vision_width']} wide x {s['vision_layers']} layers at 224 px, 64 latents, vocabulary {VOCAB_9B}). "
        f"Data: COCO Karpathy layout (`tests/eval_data.make_coco`), {args.num_samples} test items, query set of "
        f"{args.query_set_size}, seed {args.seed}, batch size {args.batch_size}; beam search with 3 beams, at most "
        f"20 new tokens. Original: `open_flamingo.eval.evaluate.evaluate_captioning` with "
        f"`tests/reference_eval.OriginalEvalModel`; ours: `modeling_flamingo.evaluation.runner.run_evaluation` with "
        f"a fresh `FlamingoEvalModel` (empty latents cache) per run. Timed: one whole trial (data, sampling, images, "
        f"generation, predictions written), best of {args.repeats}, alternating; CIDEr is computed outside the "
        f"timing, the original's through pycocoevalcap, ours through `evaluation.metrics`.\n\n"
        f"Machine: {machine(load, torch.device(args.device))}. Versions: {versions()}.\n\n"
        "| shots | batch | test items | prompt tokens (mean) | s (orig) | s (ours) | items/s (orig) | items/s (ours) "
        "| speed-up | identical predictions | CIDEr (orig) | CIDEr (ours) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        "Where the time goes in the best run (forward hooks on the vision tower, the resampler and the language "
        "model, active in every timed run; microseconds per call): images through the vision tower and the "
        "resampler, the language model's prefill and decoding steps, and the rest (annotations, image decoding and "
        "preprocessing, beam-search bookkeeping, predictions written).\n\n"
        "| shots | harness | total s | images encoded | vision + resampler s | LM prefill s | LM decode s | rest s |\n"
        "|---|---|---|---|---|---|---|---|\n" + "\n".join(split_rows) + "\n"
    )
    if notes:
        text += "\n" + "\n\n".join(notes) + "\n"
    return text


def run_classification(args, original, ours, tokenizer, image_size: int, tmp: Path, load: MachineLoad) -> str:
    """The classification tasks; returns the results section."""
    rows, split_rows, notes = [], [], []
    for task in args.classification_tasks:
        row, splits, note = measure_classification(task, args, original, ours, tokenizer, image_size, tmp)
        rows.append(row)
        split_rows += splits
        print(row, *splits, sep="\n", flush=True)
        if note:
            notes.append(note)
            print(note, file=sys.stderr)
    load.finish()
    text = (
        f"{CLASSIFICATION_SECTION} `{args.size}` ({args.device}, fp32)\n\n"
        f"Model: as the captioning benchmark's. Data (`tests/eval_data` writers, the tasks' real layouts): "
        f"{args.classification_samples} test items, query set of {args.query_set_size}, "
        f"{args.classification_shots} shots, seed {args.seed}, batch size {args.batch_size}; every prompt of a batch "
        "has the same number of tokens (no left padding, which the original's cached path would attend to: Hateful "
        "Memes OCR texts of five words, ImageNet demonstrations of one class). Class names are scored as the "
        "original's `get_rank_classifications` does, on its cached path (the default; the context once per batch, "
        "then each class name's tokens one forward at a time from a copy of its cache) and on ours (the CLI's "
        "defaults). Original: `open_flamingo.eval.evaluate.evaluate_classification` with "
        "`tests/reference_eval.OriginalEvalModel`; ours: `run_evaluation` with a fresh `FlamingoEvalModel` per run. "
        f"Timed: one whole trial, best of {args.repeats}, alternating. The class log-likelihoods of every item and "
        f"class are recorded on both sides and compared (largest absolute difference; same scores: at most {TOL} "
        "and the same ROC AUC / top-1 accuracy).\n\n"
        f"Machine: {machine(load, torch.device(args.device))}. Versions: {versions()}.\n\n"
        "| task | classes | tokens per class name (mean) | shots | batch | test items | prompt tokens (mean) "
        "| s (orig) | s (ours) | items/s (orig) | items/s (ours) | speed-up | max log-likelihood difference "
        "| same scores | AUC / accuracy (orig) | AUC / accuracy (ours) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        "Where the time goes in the best run (forward hooks, as for captioning): images through the vision tower and "
        "the resampler, the language model on the prompts (calls without a cache) and on the class names (calls "
        "continuing from the prompts' cache), and the rest (data, image preprocessing, tokenization, cache copies, "
        "log-probabilities, predictions written).\n\n"
        "| task | harness | total s | images encoded | vision + resampler s | LM on prompts s | LM on class names s "
        "| rest s |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(split_rows) + "\n"
    )
    if notes:
        text += "\n" + "\n\n".join(f"- {note}" for note in notes) + "\n"
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=["scaled9b"], default="scaled9b")
    p.add_argument(
        "--tasks", nargs="+", choices=["captioning", "classification"], default=["captioning", "classification"]
    )
    p.add_argument("--shots", type=int, nargs="+", default=[4, 32], help="captioning shots")
    p.add_argument("--num-samples", type=int, default=16, help="captioning test items per trial")
    p.add_argument("--query-set-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--classification-tasks", nargs="+", choices=CLASSIFICATION_TASKS, default=list(CLASSIFICATION_TASKS)
    )
    p.add_argument("--classification-shots", type=int, default=4)
    p.add_argument("--classification-samples", type=int, default=8, help="classification test items per task")
    p.add_argument(
        "--imagenet-classes", type=int, default=len(IMAGENET_CLASSNAMES), help="ImageNet class names ranked (first N)"
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    p.add_argument("--device", default="cpu", help="where both models run: cpu (default) or cuda")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    add_load_arguments(p)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device {args.device}: use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch sees no CUDA device here; use --device cpu")
    shots = args.shots if "captioning" in args.tasks else []
    shots += [args.classification_shots] if "classification" in args.tasks else []
    if max(shots) > args.query_set_size:
        p.error(f"--query-set-size {args.query_set_size} is smaller than {max(shots)} shots")
    if "classification" in args.tasks:
        if "imagenet" in args.classification_tasks and args.classification_samples > args.imagenet_classes:
            p.error("--classification-samples is more than --imagenet-classes (one ImageNet test item per class)")
        if args.classification_samples < 2:
            p.error("--classification-samples must be 2 or more (Hateful Memes' ROC AUC needs both labels)")

    if args.threads:
        torch.set_num_threads(args.threads)
    load = check_load(args.wait_quiet, args.max_load_per_core)
    torch.manual_seed(0)
    t = time.perf_counter()
    original, ours, tokenizer = build_models(args.size)
    original.to(device)
    ours.to(device)
    image_size = ours.config.vision_config.image_size
    print(f"built the models in {time.perf_counter() - t:.1f}s", file=sys.stderr)

    runs = {"captioning": (run_captioning, SECTION), "classification": (run_classification, CLASSIFICATION_SECTION)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        init_single_process_group(tmp)
        for task in args.tasks:
            run, section = runs[task]
            (tmp / task).mkdir()
            text = run(args, original, ours, tokenizer, image_size, tmp / task, load)
            print("\n" + text)
            write_results_section(Path(args.out), section, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
