"""Few-shot captioning evaluation, original harness vs ours on the same weights and data: items/s and predictions.

Run from the repository root in the test environment (it needs the original, `open-flamingo`, installed as
`tests/run.sh` installs it, and java for the CIDEr scores):

    .venv-test/bin/python benchmarks/bench_eval.py            # scaled-down 9B, CPU, fp32, 4 and 32 shots

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

Timed: one whole trial call (annotations read, sampling, image loading and preprocessing, generation, predictions
written), best of N, the implementations alternating. Not timed: building the models and data, and CIDEr, which both
would pay the same (the stand-ins record the predictions instead); the CIDEr of each harness's predictions is
computed afterwards, the original's through its pycocoevalcap path, ours through `evaluation.metrics`.

Forward hooks on the vision tower, the resampler and the language model (a few microseconds per model call, in
every timed run) split the best run's time: images through the vision tower and resampler (and how many), the
language model's prefill and decoding steps, and the rest (data, image preprocessing, beam-search bookkeeping).

It prints markdown tables and writes them, with the machine and versions, to `benchmarks/RESULTS.md` (or `--out`),
replacing its own section there and keeping the others.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_generation import SIZES, VOCAB_9B, build_pair, write_results_section  # noqa: E402
from eval_data import WORDS, make_coco  # noqa: E402
from reference_eval import (  # noqa: E402
    OriginalEvalModel,
    _cider_only,
    init_single_process_group,
    load_original_evaluate,
    original_args,
)

from modeling_flamingo import FlamingoProcessor  # noqa: E402
from modeling_flamingo.evaluation import metrics  # noqa: E402
from modeling_flamingo.evaluation.__main__ import build_parser  # noqa: E402
from modeling_flamingo.evaluation.eval_model import FlamingoEvalModel  # noqa: E402
from modeling_flamingo.evaluation.runner import run_evaluation  # noqa: E402
from modeling_flamingo.evaluation.tasks import TaskSpec  # noqa: E402
from modeling_flamingo.processing.image_processing_flamingo import FlamingoImageProcessor  # noqa: E402
from modeling_flamingo.testing import make_tiny_tokenizer  # noqa: E402

import reference  # noqa: E402

FLAMINGO_TOKENS = 3  # <|endofchunk|>, <image>, <PAD>: added by the original's create_model_and_transforms
SECTION = "## Evaluation: captioning"


def full_vocab_tokenizer(bos_token: str | None = None):
    """The tests' tiny tokenizer grown to the 9B's vocabulary: the caption words as whole tokens (captions then
    tokenize about one token per word, as with the 9B's GPT-NeoX tokenizer), then `" t<i>"` filler tokens."""
    tokenizer = make_tiny_tokenizer(bos_token=bos_token)
    tokenizer.add_tokens([f" {word}" for word in WORDS])
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
        self.eval_model = OriginalEvalModel(original, tokenizer, image_size=image_size)
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
# where the time goes


class Breakdown:
    """Seconds spent in the vision tower + resampler, the language model's prefill (calls with more than one new
    token) and its decoding steps, from forward hooks; and how many images went through the vision tower."""

    def __init__(self, model):
        self.model = model
        self.seconds = {"vision": 0.0, "prefill": 0.0, "decode": 0.0}
        self.images = 0
        self._start: dict[int, float] = {}

    def _timed(self, module, kind: Callable[[tuple, dict], str]):
        def pre(mod, args, kwargs):
            self._start[id(mod)] = time.perf_counter()

        def post(mod, args, kwargs, out):
            self.seconds[kind(args, kwargs)] += time.perf_counter() - self._start.pop(id(mod))

        return [
            module.register_forward_pre_hook(pre, with_kwargs=True),
            module.register_forward_hook(post, with_kwargs=True),
        ]

    def __enter__(self):
        vision, perceiver = self.model.vision_encoder, self.model.perceiver
        lm = getattr(self.model, "lang_encoder", None) or self.model.language_model
        self.handles = self._timed(vision, lambda a, k: "vision") + self._timed(perceiver, lambda a, k: "vision")
        self.handles += self._timed(lm, lambda a, k: "prefill" if _new_tokens(a, k) > 1 else "decode")

        def count(mod, args, kwargs):
            pixels = args[0] if args else kwargs["pixel_values"]
            self.images += pixels.shape[0]

        self.handles.append(vision.register_forward_pre_hook(count, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def _new_tokens(args: tuple, kwargs: dict) -> int:
    for value in (*args, kwargs.get("input_ids"), kwargs.get("inputs_embeds")):
        if isinstance(value, torch.Tensor):
            return value.shape[1]
    raise ValueError("language model called without input_ids or inputs_embeds")


# ---------------------------------------------------------------------------------------------------------------
# the run


def measure_cell(harnesses: dict, models: dict, shots: int, seed: int, repeats: int) -> dict:
    """Best-of-`repeats` seconds of one trial for every harness, alternating; the `Breakdown` of that best run and
    each harness's predictions (which must not change between repeats)."""
    res = {name: {"seconds": float("inf")} for name in harnesses}
    for _ in range(repeats):
        for name, harness in harnesses.items():
            with Breakdown(models[name]) as split:
                start = time.perf_counter()
                predictions = harness.run(shots, seed)
                elapsed = time.perf_counter() - start
            if elapsed < res[name]["seconds"]:
                res[name].update(seconds=elapsed, split=split)
            if "predictions" in res[name] and res[name]["predictions"] != predictions:
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=["scaled9b"], default="scaled9b")
    p.add_argument("--shots", type=int, nargs="+", default=[4, 32])
    p.add_argument("--num-samples", type=int, default=16, help="test items per trial")
    p.add_argument("--query-set-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = p.parse_args(argv)
    if max(args.shots) > args.query_set_size:
        p.error(f"--query-set-size {args.query_set_size} is smaller than {max(args.shots)} shots")

    if args.threads:
        torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()[0]
    torch.manual_seed(0)
    t = time.perf_counter()
    original, ours, tokenizer = build_models(args.size)
    image_size = ours.config.vision_config.image_size
    print(f"built the models in {time.perf_counter() - t:.1f}s", file=sys.stderr)

    rows, split_rows, notes = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_coco(tmp / "data", num_train=args.query_set_size + 16, num_test=args.num_samples)
        init_single_process_group(tmp)
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
                    f"| {seconds['prefill']:.1f} | {seconds['decode']:.1f} | {total - sum(seconds.values()):.1f} |"
                )
                print(split_rows[-1], flush=True)

    s = SIZES[args.size]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
    machine += f"{torch.get_num_threads()}, 1-minute load average {load_at_start:.1f} at the start, "
    machine += f"{os.getloadavg()[0]:.1f} at the end"
    text = (
        f"{SECTION} `{args.size}` (cpu, fp32)\n\n"
        f"Model: as the generation benchmark's `{args.size}` (MPT LM {s['lm_width']} wide x {s['lm_layers']} layers, "
        f"CLIP {s['vision_width']} wide x {s['vision_layers']} layers at 224 px, 64 latents, vocabulary {VOCAB_9B}). "
        f"Data: COCO Karpathy layout (`tests/eval_data.make_coco`), {args.num_samples} test items, query set of "
        f"{args.query_set_size}, seed {args.seed}, batch size {args.batch_size}; beam search with 3 beams, at most "
        f"20 new tokens. Original: `open_flamingo.eval.evaluate.evaluate_captioning` with "
        f"`tests/reference_eval.OriginalEvalModel`; ours: `modeling_flamingo.evaluation.runner.run_evaluation` with "
        f"a fresh `FlamingoEvalModel` (empty latents cache) per run. Timed: one whole trial (data, sampling, images, "
        f"generation, predictions written), best of {args.repeats}, alternating; CIDEr is computed outside the "
        f"timing, the original's through pycocoevalcap, ours through `evaluation.metrics`.\n\n"
        f"Machine: {machine}. Versions: torch {torch.__version__}, transformers {version('transformers')}, "
        f"open-flamingo {version('open-flamingo')}, open_clip {version('open_clip_torch')}.\n\n"
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
    print("\n" + text)
    write_results_section(Path(args.out), SECTION, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
