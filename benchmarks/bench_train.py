"""Training step: the original's `train_one_epoch` vs our `FlamingoTrainer` on the same weights and batches.

Run from the repository root in the test environment (it needs the original, `open-flamingo`, installed as
`tests/run.sh` installs it):

    .venv-test/bin/python benchmarks/bench_train.py                  # scaled-down 9B (bench_generation.py's), CPU, fp32
    .venv-test/bin/python benchmarks/bench_train.py --device cuda    # both implementations on the GPU

Both models are built once from the same random weights (bench_generation's `build_pair`: MPT language model 512
wide x 8 layers, CLIP 128 wide x 2 layers at 224 px, cross-attention every 4 layers, the 9B's vocabulary). One step
is what each loop does per step: a LAION batch (one image, 32 tokens) and an MMC4 batch (up to 3 images, up to 128
tokens), labels masked (the original masks inside its loop; our step is timed with `mask_flamingo_labels` included),
forward and backward of both with the recipe's loss multipliers (LAION 0.2), embedding-row masking, clipping and the
AdamW step.

- step time: wall time of `--steps` steps after one warm-up step, best of `--repeats`, the implementations
  alternating; the original driven through `open_flamingo.train.train_utils.train_one_epoch` with loaders holding
  that many batches, ours through `FlamingoTrainer.forward_backward` + `optimizer_step` (the body of its loop).
- peak memory: in a child process per implementation, above the start of the steps: on the CPU the RSS, sampled
  every millisecond, with a glibc that returns blocks of 64 KiB or more when freed (see bench_generation.py); on a
  GPU the CUDA allocator's peak.
- `--device` (cpu by default): where both implementations run, the same weights moved there (the original's loop
  reads its batches onto it through its `device_id`, ours through Accelerate, which is kept off the GPU on
  `--device cpu`); on a GPU the clocks are read after `torch.cuda.synchronize()`.

Writes a "Training step" section into `benchmarks/RESULTS.md` (or `--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from importlib.metadata import version
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_generation as gen  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

from modeling_flamingo.training import FlamingoTrainer, mask_flamingo_labels  # noqa: E402

sys.modules.setdefault("wandb", types.ModuleType("wandb"))  # the original's train_utils imports it at module level
from open_flamingo.train import train_utils  # noqa: E402

from train_helpers import MULTIPLIERS, original_train_args, train_args  # noqa: E402

LAION_TEXT = "<image>Output: a photo of two cats sleeping on a couch in a small room.<|endofchunk|><|endoftext|>"
MMC4_TEXT = (
    "A day out. <image>A dog runs after a red ball in the park.<|endofchunk|>Then we went home. <image>Two people "
    "playing tennis on a sunny day.<|endofchunk|>And later <image>A plate of food with rice and vegetables.<|endofchunk|>"
)


def make_batches(tokenizer, batch_laion: int, batch_mmc4: int, seed: int = 0) -> dict[str, dict]:
    """One LAION and one MMC4 batch in our data format (right-padded, pixel_values (B, T_img, 1, 3, 224, 224))."""
    tokenizer.padding_side = "right"
    gen_ = torch.Generator().manual_seed(seed)
    out = {}
    for name, text, b, images in (("laion", LAION_TEXT, batch_laion, 1), ("mmc4", MMC4_TEXT, batch_mmc4, 3)):
        # Samples of different lengths: drop words from the end of some.
        texts = [
            text if i % 2 == 0 else text.replace("in a small room", "").replace("And later", "") for i in range(b)
        ]
        enc = tokenizer(texts, return_tensors="pt", padding="longest", truncation=True, max_length=128)
        out[name] = {
            "pixel_values": torch.randn(b, images, 1, 3, 224, 224, generator=gen_),
            "input_ids": enc.input_ids,
            "attention_mask": enc.attention_mask,
        }
    return out


class _Loader(list):
    def __init__(self, items):
        super().__init__(items)
        self.num_batches = len(items)


class _Wrapped(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, **kwargs):
        return self.module(**kwargs)


class OriginalLoop:
    def __init__(self, original, tokenizer, batches: dict[str, dict], device: torch.device):
        self.model = _Wrapped(original.to(device)).train()
        self.device = device
        self.tokenizer = tokenizer
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if "gated_cross_attn" in n], "weight_decay": 0.1},
            {"params": [p for n, p in named if "gated_cross_attn" not in n], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=1e-4)
        from transformers import get_constant_schedule_with_warmup

        self.scheduler = get_constant_schedule_with_warmup(self.optimizer, 0)
        laion, mmc4 = batches["laion"], batches["mmc4"]
        self.laion = (laion["pixel_values"][:, 0, 0], (laion["input_ids"], laion["attention_mask"]))
        pairs = [(i[None], m[None]) for i, m in zip(mmc4["input_ids"], mmc4["attention_mask"], strict=True)]
        self.mmc4 = (mmc4["pixel_values"][:, :, 0], pairs)
        self.args = original_train_args(logging_steps=10**9)

    def run(self, steps: int) -> None:
        train_utils.train_one_epoch(
            args=self.args,
            model=self.model,
            epoch=0,
            laion_loader=_Loader([self.laion] * steps),
            mmc4_loader=_Loader([self.mmc4] * steps),
            tokenizer=self.tokenizer,
            optimizer=self.optimizer,
            lr_scheduler=self.scheduler,
            device_id=self.device,
            wandb=None,
        )


class OurLoop:
    def __init__(self, ours, tokenizer, batches: dict[str, dict], run_dir: str, device: torch.device):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        args = train_args(
            learning_rate=1e-4,
            warmup_steps=0,
            run_name=run_dir,
            logging_steps=0,
            loss_multiplier_laion=MULTIPLIERS["laion"],
            loss_multiplier_mmc4=MULTIPLIERS["mmc4"],
        )
        self.batches = batches
        self.media, self.eoc = ours.config.media_token_id, ours.config.eoc_token_id
        self.pad = tokenizer.pad_token_id
        # Accelerate takes the GPU whenever there is one: on --device cpu it is told not to, as the original is.
        cpu = {"ACCELERATE_USE_CPU": "true"} if device.type == "cpu" else {}
        with mock.patch.dict(os.environ, cpu):
            self.trainer = FlamingoTrainer(
                args, ours, None, lambda epoch: {k: _Loader([v]) for k, v in batches.items()}
            )
        if self.trainer.accelerator.device.type != device.type:
            raise RuntimeError(f"Accelerate placed our model on {self.trainer.accelerator.device}, not {device}")
        self.trainer.model.train()

    def run(self, steps: int) -> None:
        for _ in range(steps):
            step = {}
            for name, batch in self.batches.items():
                labels = mask_flamingo_labels(batch["input_ids"], self.pad, self.media, self.eoc, name == "mmc4")
                step[name] = {**batch, "labels": labels}
            self.trainer.forward_backward(step, sync=True)
            self.trainer.optimizer_step()


def build_loops(args, run_dir: str) -> dict:
    torch.manual_seed(0)
    original, ours, tokenizer = gen.build_pair(args.size)
    original.train()
    batches = make_batches(tokenizer, args.batch_laion, args.batch_mmc4)
    device = torch.device(args.device)
    loops = {}
    if args.impl in (None, "original"):
        loops["original"] = OriginalLoop(original, tokenizer, batches, device)
    if args.impl in (None, "ours"):
        loops["ours"] = OurLoop(ours, tokenizer, batches, run_dir, device)
    return loops


def timed_steps(loop, steps: int, device: torch.device) -> float:
    """Seconds per step of `steps` steps of `loop`, the GPU's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    loop.run(steps)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(gen.SIZES), default="scaled9b", help="bench_generation.py's sizes")
    p.add_argument("--batch-laion", type=int, default=8)
    p.add_argument("--batch-mmc4", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", help="where both implementations run: cpu (default) or cuda")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    p.add_argument("--impl", choices=["original", "ours"], help=argparse.SUPPRESS)  # internal: peak-memory child
    p.add_argument("--peak-to", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device {args.device}: use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch sees no CUDA device here; use --device cpu")

    with tempfile.TemporaryDirectory() as tmp:
        if args.peak_to:  # child: one implementation, peak memory of its steps (RSS, or the CUDA allocator's)
            loop = build_loops(args, str(Path(tmp) / "run"))[args.impl]
            loop.run(1)
            with gen.PeakMemory(device) as peak:
                loop.run(args.steps)
            Path(args.peak_to).write_text(json.dumps(peak.bytes / 2**20))
            return 0

        peaks = {}
        for impl in ("original", "ours"):
            out = Path(tmp) / f"{impl}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--impl", impl, "--peak-to", str(out)]
            cmd += ["--batch-laion", str(args.batch_laion), "--batch-mmc4", str(args.batch_mmc4)]
            cmd += ["--steps", str(args.steps), "--device", args.device, "--size", args.size]
            subprocess.run(cmd, env=dict(os.environ, **gen.TRIMMING_MALLOC), check=True)
            peaks[impl] = json.loads(out.read_text())

        loops = build_loops(args, str(Path(tmp) / "run"))
        for loop in loops.values():
            loop.run(1)  # warm-up
        best = {impl: float("inf") for impl in loops}
        for _ in range(args.repeats):
            for impl, loop in loops.items():
                best[impl] = min(best[impl], timed_steps(loop, args.steps, device))

    machine = gen.machine_line(device)
    header = "| batch (LAION + MMC4) | step s (orig) | step s (ours) | speed-up | peak MiB (orig) | peak MiB (ours) | memory ratio |"
    row = (
        f"| {args.batch_laion} + {args.batch_mmc4} | {best['original']:.3f} | {best['ours']:.3f} | "
        f"{best['original'] / best['ours']:.2f}x | {peaks['original']:.0f} | {peaks['ours']:.0f} | "
        f"{peaks['ours'] / peaks['original']:.2f} |"
    )
    s = gen.SIZES[args.size]
    title = f"## Training step: `{args.size}` ({args.device}, float32)"
    text = (
        f"{title}\n\n"
        f"Model: MPT LM {s['lm_width']} wide x {s['lm_layers']} layers, CLIP {s['vision_width']} wide x "
        f"{s['vision_layers']} layers at 224 px, cross-attention every 4 layers, vocabulary {gen.VOCAB_9B}. One step: "
        f"a LAION batch (1 image each) and an MMC4 batch (3 images each, up to 128 tokens), forward and backward of "
        f"both (LAION loss x 0.2), embedding-row masking, clipping, AdamW; mean of {args.steps} steps, best of "
        f"{args.repeats}, after a warm-up step.\n\n"
        f"Machine: {machine}. Versions: torch {torch.__version__}, transformers {version('transformers')}, "
        f"accelerate {version('accelerate')}, open-flamingo {version('open-flamingo')}.\n\n"
        "Speed-up is original time / ours (higher is better); memory ratio is ours / original (lower is better). "
        + (
            "CPU peaks come from a child process per implementation whose allocator returns freed memory at once.\n\n"
            if device.type == "cpu"
            else "Peaks are the CUDA allocator's, in a child process per implementation.\n\n"
        )
        + f"{header}\n|---|---|---|---|---|---|---|\n{row}\n"
    )
    print("\n" + text)
    gen.write_results_section(Path(args.out), title, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
