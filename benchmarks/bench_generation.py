"""Original OpenFlamingo vs ours on the same weights: prefill latency, decode tokens/s and peak memory.

Run from the repository root in the test environment (it needs the original, `open-flamingo`, installed as
`tests/run.sh` installs it):

    .venv-test/bin/python benchmarks/bench_generation.py                      # scaled-down 9B, CPU, fp32
    .venv-test/bin/python benchmarks/bench_generation.py --size 3b --device cuda --dtype bfloat16

Both models are built once from the same random weights (ours receives the original's through the same key
mapping the converter uses), then each (shots, batch) cell is timed for both, alternating. On the CPU, a child process
builds them again from the same seed to measure peak memory (see below). Prompts
are OpenFlamingo-style few-shot captions: `<image>Output: ...<|endofchunk|>` k times, then `<image>Output:`.

- prefill: time to the first token's logits in generate (the images through the vision tower and resampler, the
  prompt through the language model), best of N.
- decode tokens/s: greedy, 32 new tokens forced (`min_new_tokens`); the time from the first to the last decoding
  step (a logits processor records when each step's logits are ready), best of N, the implementations alternating.
- LM alone: the bare language model (our copy of its weights, cross-attention layers left out) decoding the same
  token ids. Every Flamingo implementation on this language model pays at least its step, so (LM alone / original)
  is the ceiling of the decode speed-up on this machine.
- blocks: the time a decoding step of ours spends in its gated cross-attention blocks (forward hooks, best of N
  extra runs). Every implementation runs those layers at every step too, so original / (LM alone + blocks) is a
  tighter ceiling.
- peak memory: during generate(32), above what was allocated before it (CUDA allocator peak on GPU; on CPU the
  RSS, sampled every millisecond, of a child process whose glibc returns blocks of 64 KiB or more when freed; the
  timings run with the default allocator, as users do).

It prints a markdown table of ratios (ours / original) and writes it with the machine and versions to
`benchmarks/RESULTS.md` (or `--out`).

`--compile` measures instead our decode compiled (`torch.compile` through transformers' `compile_config`, inductor)
against our eager decode, both with a static cache (`--cache static` is implied): decode tokens/s of each, best of N,
alternating, after one untimed compiled call (the compilation), and whether their greedy tokens are equal.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from importlib.metadata import version
from pathlib import Path

import psutil
import torch
from transformers import (
    CLIPVisionConfig,
    CompileConfig,
    LlamaConfig,
    LogitsProcessor,
    LogitsProcessorList,
    MptConfig,
)

from modeling_flamingo.configuration.configuration_flamingo import FlamingoConfig
from modeling_flamingo.modeling_flamingo import FlamingoForConditionalGeneration, FlamingoGatedCrossAttentionBlock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _machine import add_load_arguments, check_load  # noqa: E402

from reference import build_original, ours_from_original  # noqa: E402

# The 9B: CLIP ViT-L/14 (1024 wide) into MPT-7B (4096 wide, 32 layers), cross-attention every 4 layers,
# 50,280 + 3 token vocabulary, 64 latents per image. "scaled9b" keeps those ratios at a size a 2-core CPU runs.
VOCAB_9B = 50283
SIZES = {
    "scaled9b": dict(lm_width=512, lm_layers=8, lm_heads=8, vision_width=128, vision_layers=2, vision_heads=2),
    "3b": dict(lm_width=2048, lm_layers=24, lm_heads=16, vision_width=1024, vision_layers=24, vision_heads=16),
    # The GPU script's dry run (benchmarks/gpu/run.sh --dry-run): the same layout, small enough for seconds on a CPU.
    "tiny": dict(lm_width=64, lm_layers=4, lm_heads=4, vision_width=32, vision_layers=1, vision_heads=2),
}


def write_results_section(out: Path, marker: str, text: str) -> None:
    """Replace the section of `out` whose heading starts with `marker` by `text` (or add it), keeping every other
    section; written through a temporary file, so an interrupted run leaves the previous results whole."""
    previous = out.read_text() if out.exists() else ""
    kept = [block for block in previous.split("\n## ") if block and not ("## " + block).startswith(marker)]
    kept = [b if b.startswith("#") else "## " + b for b in kept]
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n".join(kept + [text]) if kept else "# Benchmarks\n\n" + text)
    tmp.replace(out)


def scaled_configs(shape: dict) -> tuple[MptConfig, CLIPVisionConfig]:
    """(language model, vision tower) configs of the 9B's layout (MPT with ALiBi, CLIP ViT/14 at 224 px, QuickGELU,
    the 9B's vocabulary) at the widths and depths of `shape` (an entry of `SIZES`, or the GPU script's 9B shape)."""
    text = MptConfig(
        vocab_size=VOCAB_9B,
        d_model=shape["lm_width"],
        n_heads=shape["lm_heads"],
        n_layers=shape["lm_layers"],
        max_seq_len=2048,
        attn_config={"alibi": True},
        use_cache=True,
    )
    vision = CLIPVisionConfig(
        hidden_size=shape["vision_width"],
        intermediate_size=4 * shape["vision_width"],
        num_hidden_layers=shape["vision_layers"],
        num_attention_heads=shape["vision_heads"],
        patch_size=14,
        image_size=224,
        hidden_act="quick_gelu",
    )
    return text, vision


def build_pair(size: str, every_n: int = 4):
    text, vision = scaled_configs(SIZES[size])
    original, tokenizer = build_original(
        "mpt", cross_attn_every_n_layers=every_n, text_config=text, vision_config=vision
    )
    # The factory shrank the embeddings to the tiny tokenizer; give both models the 9B's vocabulary back.
    original.lang_encoder.resize_token_embeddings(VOCAB_9B)
    ours = ours_from_original(original, tokenizer, "mpt", vision_config=vision)
    return original, ours, tokenizer


def llama_twin(flamingo: FlamingoConfig, shape: dict) -> FlamingoForConditionalGeneration:
    """Ours with a LLaMA language model of `shape`'s width, depth and vocabulary (random weights; `shape` an entry of
    `SIZES` or the GPU script's 9B shape) beside the vision tower config and token ids of `flamingo` (the MPT model's
    config): for compiled decoding, since transformers' `MptAttention` cannot be compiled whole (its cache is sliced
    by a data-dependent length), so the MPT models of the other sections have no compiled decode. Built on the
    default device and dtype."""
    text = LlamaConfig(
        vocab_size=VOCAB_9B,
        hidden_size=shape["lm_width"],
        intermediate_size=4 * shape["lm_width"],
        num_hidden_layers=shape["lm_layers"],
        num_attention_heads=shape["lm_heads"],
        max_position_embeddings=2048,
        use_cache=True,
    )
    config = FlamingoConfig(
        vision_config=flamingo.vision_config.to_dict(),
        text_config=text.to_dict(),
        cross_attn_every_n_layers=flamingo.cross_attn_every_n_layers,
        media_token_id=flamingo.media_token_id,
        eoc_token_id=flamingo.eoc_token_id,
    )
    return FlamingoForConditionalGeneration(config).eval()


def prompt(shots: int) -> str:
    demo = "<image>Output: a photo of two cats sleeping on a couch.<|endofchunk|>"
    return demo * shots + "<image>Output:"


class PeakMemory:
    """Peak memory above the starting point while the block runs."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.proc = psutil.Process()
            self.start = self.proc.memory_info().rss
            self.peak = self.start
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.start
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self.bytes = self.peak - self.start


def bare_language_model(ours):
    """The language model alone, without the cross-attention layers, on our copy of its weights: its decode step is
    the floor any Flamingo implementation built on it pays, so (original's step) / (its step) bounds the speed-up."""
    lm = type(ours.language_model)(ours.config.text_config)
    state = {
        k.replace(".decoder_layer.", "."): v
        for k, v in ours.language_model.state_dict().items()
        if ".gated_cross_attn_layer." not in k
    }
    missing, unexpected = lm.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("lm_head.weight") for k in missing), (missing, unexpected)
    lm.tie_weights()
    return lm


class Cell:
    """One (shots, batch) prompt and the calls that run it through each implementation ("original", "ours", or
    "lm": the bare language model on the same token ids, images left out)."""

    def __init__(self, tokenizer, shots: int, batch: int, device, dtype, cache: str, image_size: int = 224):
        self.batch = batch
        self.enc = tokenizer([prompt(shots)] * batch, return_tensors="pt").to(device)
        gen = torch.Generator().manual_seed(shots * 100 + batch)
        self.pixels = torch.randn(batch, shots + 1, 1, 3, image_size, image_size, generator=gen).to(device, dtype)
        self.common = dict(do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
        if cache != "dynamic":
            self.common["cache_implementation"] = cache

    @property
    def prompt_len(self) -> int:
        return self.enc.input_ids.shape[1]

    @torch.no_grad()
    def generate(self, impl: str, model, n: int, timer=None, **extra) -> torch.Tensor:
        kwargs = dict(
            attention_mask=self.enc.attention_mask,
            max_new_tokens=n,
            min_new_tokens=n,
            logits_processor=LogitsProcessorList([timer] if timer else []),
            **self.common,
            **extra,
        )
        if impl == "original":
            out = model.generate(self.pixels, self.enc.input_ids, **kwargs)
        elif impl == "ours":
            out = model.generate(input_ids=self.enc.input_ids, pixel_values=self.pixels, **kwargs)
        else:
            out = model.generate(input_ids=self.enc.input_ids, **kwargs)
        return out[:, self.prompt_len :].cpu()


def measure_speed(cell: Cell, models: dict, new_tokens: int, device, repeats: int) -> dict:
    """Best-of-`repeats` prefill seconds (generate's call to the first token's logits) and decode tokens/s (first
    to last token's logits) of every model, the implementations alternating within each repeat so that a slow spell
    of the machine hits all of them."""
    res = {impl: {"prefill_s": float("inf"), "decode_s": float("inf")} for impl in models}
    for _ in range(repeats):
        for impl, model in models.items():
            timer = StepTimer(device)
            start = timer.now()
            res[impl]["tokens"] = cell.generate(impl, model, new_tokens, timer)
            res[impl]["prefill_s"] = min(res[impl]["prefill_s"], timer.stamps[0] - start)
            res[impl]["decode_s"] = min(res[impl]["decode_s"], timer.stamps[-1] - timer.stamps[0])
    for r in res.values():
        r["decode_tok_s"] = cell.batch * (new_tokens - 1) / r["decode_s"]
    return res


@torch.no_grad()
def block_seconds_per_step(cell: Cell, ours, new_tokens: int, device, repeats: int) -> float:
    """Seconds a decoding step of ours spends in its gated cross-attention blocks (layer norms, query and output
    projections, attention to the token's image, feed-forward, gates), timed with forward hooks in `repeats` extra
    `generate` calls (best of them, like the step times). Every implementation runs these layers at every step, so
    (original's step) / (LM alone's step + this) is a tighter ceiling than the LM alone's."""
    blocks = [m for m in ours.modules() if isinstance(m, FlamingoGatedCrossAttentionBlock)]
    spans: list[float] = []
    start: dict[int, float] = {}
    timer = StepTimer(device)
    handles = []
    for block in blocks:
        handles.append(block.register_forward_pre_hook(lambda m, args: start.__setitem__(id(m), timer.now())))
        handles.append(block.register_forward_hook(lambda m, args, out: spans.append(timer.now() - start[id(m)])))
    best = float("inf")
    try:
        for _ in range(repeats):
            spans.clear()
            cell.generate("ours", ours, new_tokens)
            decode_spans = spans[len(blocks) :]  # the first call of each block is the prefill
            assert len(decode_spans) == len(blocks) * (new_tokens - 1), (len(spans), len(blocks))
            best = min(best, sum(decode_spans) / (new_tokens - 1))
    finally:
        for handle in handles:
            handle.remove()
    return best


def compile_config(device: torch.device, backend: str = "inductor") -> CompileConfig:
    """`backend` (inductor; the GPU script's CPU dry run uses aot_eager, which traces the same graph without minutes
    of C++ compilation) on the whole forward of a decoding step (no graph break allowed); CUDA graphs on a GPU."""
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    config = CompileConfig(fullgraph=True, backend=backend, mode=mode)
    config._compile_all_devices = True  # transformers auto-compiles on accelerators only
    return config


def measure_compiled(cell: Cell, ours, new_tokens: int, device, repeats: int, backend: str = "inductor") -> dict:
    """Decode tokens/s of ours eager and compiled with `backend` (static cache for both; `cell` must have been built
    with `cache="static"`), best of `repeats`, alternating, after one untimed compiled call; and whether the greedy
    tokens are equal."""
    config = compile_config(device, backend)
    cell.generate("ours", ours, new_tokens, compile_config=config)  # compiles the decoding step
    res = {mode: {"decode_s": float("inf")} for mode in ("eager", "compiled")}
    for _ in range(repeats):
        for mode, extra in (("eager", {}), ("compiled", {"compile_config": config})):
            timer = StepTimer(device)
            res[mode]["tokens"] = cell.generate("ours", ours, new_tokens, timer, **extra)
            res[mode]["decode_s"] = min(res[mode]["decode_s"], timer.stamps[-1] - timer.stamps[0])
    for r in res.values():
        r["decode_tok_s"] = cell.batch * (new_tokens - 1) / r["decode_s"]
    res["same_tokens"] = torch.equal(res["eager"]["tokens"], res["compiled"]["tokens"])
    return res


def compiled_section(args, ours, tokenizer, device, dtype) -> str:
    """The `--compile` run: a table of eager against compiled decode of ours, one row per (shots, batch)."""
    lm = ", LLaMA" if args.lm == "llama" else ""
    rows = []
    for shots in args.shots:
        for batch in args.batch:
            cell = Cell(tokenizer, shots, batch, device, dtype, "static")
            res = measure_compiled(cell, ours, args.new_tokens, device, args.repeats)
            e, c = res["eager"], res["compiled"]
            rows.append(
                f"| {shots} | {batch} | {cell.prompt_len} | {e['decode_tok_s']:.1f} | {c['decode_tok_s']:.1f} "
                f"| **{c['decode_tok_s'] / e['decode_tok_s']:.2f}x** | {'yes' if res['same_tokens'] else 'NO'} |"
            )
            print(rows[-1], flush=True)
    return (
        f"## Generation: compiled decoding, `{args.size}`{lm} ({args.device}, {args.dtype}, static cache)\n\n"
        f"Ours only (the original's forward cannot be compiled whole), eager against `torch.compile` (inductor, "
        f"`fullgraph=True`, through transformers' `compile_config`), both with a static cache; greedy, "
        f"{args.new_tokens} new tokens; decode tokens/s, best of {args.repeats}, alternating, after one untimed "
        f"compiled call. Model as in the `{args.size}` generation sections"
        + (
            ", with a LLaMA language model of the same width, depth and vocabulary (`llama_twin`)"
            if args.lm == "llama"
            else ""
        )
        + ".\n\n"
        f"Machine: {machine_line(device)}, 1-minute load average {os.getloadavg()[0]:.1f} at the end. Versions: "
        f"torch {torch.__version__}, transformers {version('transformers')}.\n\n"
        "| shots | batch | prompt tokens | decode tok/s (eager) | decode tok/s (compiled) | speed-up | same tokens |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )


def machine_line(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def measure_peak(cell: Cell, impl: str, model, new_tokens: int, device) -> float:
    """Peak MiB above the starting point during generate(new_tokens)."""
    with PeakMemory(device) as mem:
        cell.generate(impl, model, new_tokens)
    return mem.bytes / 2**20


class StepTimer(LogitsProcessor):
    """Records when each decoding step's logits are ready: the decode time is the span from the first to the last."""

    def __init__(self, device):
        self.device = device
        self.stamps: list[float] = []

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def __call__(self, input_ids, scores):
        self.stamps.append(self.now())
        return scores


# glibc keeps freed blocks for reuse, which hides from the RSS what a call allocates; with these settings every block
# of 64 KiB or more is mmap-ed and returned to the system when freed.
TRIMMING_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def cpu_peaks_in_child(args) -> dict[str, float]:
    """On the CPU, peak memory is read from the RSS of a child process run with `TRIMMING_MALLOC`. That setting makes
    every large allocation fault its pages in afresh, which no user runs with, so it stays out of the timings."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peaks.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--size", args.size, "--device", args.device]
        cmd += ["--dtype", args.dtype, "--new-tokens", str(args.new_tokens), "--cache", args.cache]
        cmd += ["--shots", *map(str, args.shots), "--batch", *map(str, args.batch), "--peaks-to", str(out)]
        subprocess.run(cmd, env=dict(os.environ, **TRIMMING_MALLOC), check=True)
        return json.loads(out.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="scaled9b")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--shots", type=int, nargs="+", default=[0, 4, 32])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--cache", choices=["dynamic", "static"], default="dynamic", help="language-model cache for both (generate's)"
    )
    p.add_argument(
        "--compile", action="store_true", help="ours compiled against ours eager, static cache (see the docstring)"
    )
    p.add_argument(
        "--lm",
        choices=["mpt", "llama"],
        default="mpt",
        help="with --compile: the language model (mpt as the 9B, which cannot be compiled whole; or llama of the "
        "same size)",
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    p.add_argument("--peaks-to", help=argparse.SUPPRESS)  # internal: the CPU peak-memory child writes here
    add_load_arguments(p)
    args = p.parse_args(argv)
    if args.compile and args.lm == "mpt":
        p.error(
            "--compile needs --lm llama: transformers' MptAttention slices its cache by a data-dependent length, so an "
            "MPT model cannot be compiled whole"
        )
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    load = None if args.peaks_to else check_load(args.wait_quiet, args.max_load_per_core)

    if args.compile:
        torch.manual_seed(0)
        _, ours, tokenizer = build_pair(args.size)
        if args.lm == "llama":
            torch.manual_seed(0)
            ours = llama_twin(ours.config, SIZES[args.size])
        ours.to(device, dtype).eval()
        text = compiled_section(args, ours, tokenizer, device, dtype)
        print("\n" + text)
        write_results_section(
            Path(args.out),
            f"## Generation: compiled decoding, `{args.size}`{', LLaMA' if args.lm == 'llama' else ''} ({args.device}",
            text,
        )
        return 0

    peaks = cpu_peaks_in_child(args) if device.type == "cpu" and not args.peaks_to else {}

    torch.manual_seed(0)
    t = time.perf_counter()
    original, ours, tokenizer = build_pair(args.size)
    models = {"original": original, "ours": ours}
    if not args.peaks_to:  # the peak-memory child measures the two implementations only
        models["lm"] = bare_language_model(ours)
    for model in models.values():
        model.to(device, dtype).eval()
    print(f"built the models in {time.perf_counter() - t:.1f}s", file=sys.stderr)

    if args.peaks_to:
        for shots in args.shots:
            for batch in args.batch:
                cell = Cell(tokenizer, shots, batch, device, dtype, args.cache)
                for impl in ("original", "ours"):
                    cell.generate(impl, models[impl], 2)  # one-time allocations out of the way
                    peaks[f"{shots},{batch},{impl}"] = measure_peak(cell, impl, models[impl], args.new_tokens, device)
        Path(args.peaks_to).write_text(json.dumps(peaks))
        return 0

    rows = []
    for shots in args.shots:
        for batch in args.batch:
            cell = Cell(tokenizer, shots, batch, device, dtype, args.cache)
            res = measure_speed(cell, models, args.new_tokens, device, args.repeats)
            for impl in ("original", "ours"):
                key = f"{shots},{batch},{impl}"
                if key not in peaks:
                    peaks[key] = measure_peak(cell, impl, models[impl], args.new_tokens, device)
                res[impl]["peak_mib"] = peaks[key]
            same = torch.equal(res["original"]["tokens"], res["ours"]["tokens"])
            o, u, lm = res["original"], res["ours"], res["lm"]
            blocks_s = block_seconds_per_step(cell, ours, args.new_tokens, device, args.repeats)
            step_s = {impl: r["decode_s"] / (args.new_tokens - 1) for impl, r in res.items()}
            rows.append(
                f"| {shots} | {batch} | {cell.prompt_len} | {o['prefill_s'] * 1e3:.1f} | {u['prefill_s'] * 1e3:.1f} "
                f"| **{o['prefill_s'] / u['prefill_s']:.2f}x** | {o['decode_tok_s']:.1f} | {u['decode_tok_s']:.1f} "
                f"| **{u['decode_tok_s'] / o['decode_tok_s']:.2f}x** | {lm['decode_tok_s']:.1f} "
                f"| {lm['decode_tok_s'] / o['decode_tok_s']:.2f}x | {blocks_s * 1e3:.2f} "
                f"| {step_s['original'] / (step_s['lm'] + blocks_s):.2f}x | {o['peak_mib']:.0f} | {u['peak_mib']:.0f} "
                f"| **{u['peak_mib'] / max(o['peak_mib'], 1e-9):.2f}** | {'yes' if same else 'NO'} |"
            )
            print(rows[-1], flush=True)

    header = (
        "| shots | batch | prompt tokens | prefill ms (orig) | prefill ms (ours) | prefill speed-up "
        "| decode tok/s (orig) | decode tok/s (ours) | decode speed-up | decode tok/s (LM alone) "
        "| ceiling (LM alone / orig) | blocks ms/step (ours) | ceiling with blocks | peak MiB (orig) "
        "| peak MiB (ours) | peak ours/orig | same tokens |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    s = SIZES[args.size]
    machine = machine_line(device)
    load.finish()
    machine += f"; {load.describe()}"
    text = (
        f"## Generation: `{args.size}` ({args.device}, {args.dtype}, {args.cache} cache)\n\n"
        f"Model: MPT LM {s['lm_width']} wide x {s['lm_layers']} layers, CLIP {s['vision_width']} wide x "
        f"{s['vision_layers']} layers at 224 px (256 tokens), cross-attention every 4 layers, 64 latents, vocabulary "
        f"{VOCAB_9B}; greedy, {args.new_tokens} new tokens; best of {args.repeats}.\n\n"
        f"Machine: {machine}. Versions: torch {torch.__version__}, transformers {version('transformers')}, "
        f"open-flamingo {version('open-flamingo')}, open_clip {version('open_clip_torch')}.\n\n"
        f"Speed-ups are original time / ours (higher is better); peak memory is ours / original (lower is better). "
        f'"LM alone" is the bare language model (no images, no cross-attention layers) decoding the same token ids '
        f"with the same cache: the ceiling is the decode speed-up an implementation whose image handling cost nothing "
        f'would reach. "Blocks" is the time a decoding step of ours spends in its gated cross-attention blocks '
        f"(forward hooks, best of {args.repeats} extra runs), layers every implementation runs at every step: the "
        f"ceiling with blocks is the original's step / (LM alone's step + blocks). "
        f"Timings use the default allocator; CPU peaks come from a child process whose allocator returns "
        f"freed memory at once.\n\n"
        f"{header}\n" + "\n".join(rows) + "\n"
    )
    print("\n" + text)
    write_results_section(
        Path(args.out), f"## Generation: `{args.size}` ({args.device}, {args.dtype}, {args.cache} cache)", text
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
