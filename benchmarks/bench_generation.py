"""Original OpenFlamingo vs ours on the same weights: prefill latency, decode tokens/s and peak memory.

Run from the repository root in the test environment (it needs the original, `open-flamingo`, installed as
`tests/run.sh` installs it):

    .venv-test/bin/python benchmarks/bench_generation.py                      # scaled-down 9B, CPU, fp32
    .venv-test/bin/python benchmarks/bench_generation.py --size 3b --device cuda --dtype bfloat16

Both models are built once in this process from the same random weights (ours receives the original's through
the same key mapping the converter uses), then each (shots, batch) cell is measured for both, alternating. Prompts
are OpenFlamingo-style few-shot captions: `<image>Output: ...<|endofchunk|>` k times, then `<image>Output:`.

- prefill: one forward over the prompt with its images (vision tower, resampler, language model), best of N.
- decode tokens/s: greedy, 32 new tokens forced (`min_new_tokens`); the time from the first to the last decoding
  step (a logits processor records when each step's logits are ready), best of N.
- peak memory: during generate(32), above what was allocated before it (CUDA allocator peak on GPU; on CPU the
  process RSS sampled every millisecond, with glibc told to return freed blocks of 64 KiB or more at once).

It prints a markdown table of ratios (ours / original) and writes it with the machine and versions to
`benchmarks/RESULTS.md` (or `--out`).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import threading
import time
from importlib.metadata import version
from pathlib import Path

import psutil
import torch
from transformers import CLIPVisionConfig, LogitsProcessor, LogitsProcessorList, MptConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from reference import build_original, ours_from_original  # noqa: E402

# The 9B: CLIP ViT-L/14 (1024 wide) into MPT-7B (4096 wide, 32 layers), cross-attention every 4 layers,
# 50,280 + 3 token vocabulary, 64 latents per image. "scaled9b" keeps those ratios at a size a 2-core CPU runs.
VOCAB_9B = 50283
SIZES = {
    "scaled9b": dict(lm_width=512, lm_layers=8, lm_heads=8, vision_width=128, vision_layers=2, vision_heads=2),
    "3b": dict(lm_width=2048, lm_layers=24, lm_heads=16, vision_width=1024, vision_layers=24, vision_heads=16),
}


def build_pair(size: str, every_n: int = 4):
    s = SIZES[size]
    text = MptConfig(
        vocab_size=VOCAB_9B,
        d_model=s["lm_width"],
        n_heads=s["lm_heads"],
        n_layers=s["lm_layers"],
        max_seq_len=2048,
        attn_config={"alibi": True},
        use_cache=True,
    )
    vision = CLIPVisionConfig(
        hidden_size=s["vision_width"],
        intermediate_size=4 * s["vision_width"],
        num_hidden_layers=s["vision_layers"],
        num_attention_heads=s["vision_heads"],
        patch_size=14,
        image_size=224,
        hidden_act="quick_gelu",
    )
    original, tokenizer = build_original(
        "mpt", cross_attn_every_n_layers=every_n, text_config=text, vision_config=vision
    )
    # The factory shrank the embeddings to the tiny tokenizer; give both models the 9B's vocabulary back.
    original.lang_encoder.resize_token_embeddings(VOCAB_9B)
    ours = ours_from_original(original, tokenizer, "mpt", vision_config=vision)
    return original, ours, tokenizer


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


def timed(fn, device, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


@torch.no_grad()
def measure(
    impl: str, model, tokenizer, shots: int, batch: int, new_tokens: int, device, dtype, repeats: int, cache: str
):
    text = [prompt(shots)] * batch
    enc = tokenizer(text, return_tensors="pt").to(device)
    gen = torch.Generator().manual_seed(shots * 100 + batch)
    pixels = torch.randn(batch, shots + 1, 1, 3, 224, 224, generator=gen).to(device, dtype)
    common = dict(do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    if cache != "dynamic":
        common["cache_implementation"] = cache
    if impl == "original":

        def prefill():
            model(pixels, enc.input_ids, attention_mask=enc.attention_mask, use_cache=True)

        def generate(n, timer):
            return model.generate(
                pixels,
                enc.input_ids,
                attention_mask=enc.attention_mask,
                max_new_tokens=n,
                min_new_tokens=n,
                logits_processor=LogitsProcessorList([timer] if timer else []),
                **common,
            )
    else:

        def prefill():
            model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=pixels, use_cache=True)

        def generate(n, timer):
            return model.generate(
                input_ids=enc.input_ids,
                attention_mask=enc.attention_mask,
                pixel_values=pixels,
                max_new_tokens=n,
                min_new_tokens=n,
                logits_processor=LogitsProcessorList([timer] if timer else []),
                **common,
            )

    prefill_s = timed(prefill, device, repeats)
    decode_s = float("inf")
    for _ in range(repeats):
        timer = StepTimer(device)
        generate(new_tokens, timer)
        decode_s = min(decode_s, timer.stamps[-1] - timer.stamps[0])
    with PeakMemory(device) as mem:
        out = generate(new_tokens, None)
    return {
        "prefill_s": prefill_s,
        "decode_tok_s": batch * (new_tokens - 1) / decode_s,
        "peak_mib": mem.bytes / 2**20,
        "tokens": out[:, enc.input_ids.shape[1] :].cpu(),
        "prompt_len": enc.input_ids.shape[1],
    }


class StepTimer(LogitsProcessor):
    """Records when each decoding step's logits are ready: the decode time is the span from the first to the last."""

    def __init__(self, device):
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        return scores


def _reexec_with_trimming_malloc() -> None:
    """On the CPU, peak memory is read from the process RSS. glibc keeps freed blocks for reuse, which hides what a
    call allocates: restart once with every block of 64 KiB or more mmap-ed and returned to the system when freed."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and sys.platform.startswith("linux"):
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main(argv=None) -> int:
    if argv is None:
        _reexec_with_trimming_malloc()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="scaled9b")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--shots", type=int, nargs="+", default=[0, 4, 32])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--cache", choices=["dynamic", "static"], default="dynamic", help="language-model cache for both (generate's)"
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = p.parse_args(argv)

    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    t = time.perf_counter()
    original, ours, tokenizer = build_pair(args.size)
    original.to(device, dtype).eval()
    ours.to(device, dtype).eval()
    print(f"built both models in {time.perf_counter() - t:.1f}s", file=sys.stderr)

    rows = []
    for shots in args.shots:
        for batch in args.batch:
            res = {}
            for impl, model in (("original", original), ("ours", ours)):
                res[impl] = measure(
                    impl, model, tokenizer, shots, batch, args.new_tokens, device, dtype, args.repeats, args.cache
                )
            same = torch.equal(res["original"]["tokens"], res["ours"]["tokens"])
            o, u = res["original"], res["ours"]
            rows.append(
                f"| {shots} | {batch} | {u['prompt_len']} | {o['prefill_s'] * 1e3:.1f} | {u['prefill_s'] * 1e3:.1f} "
                f"| **{o['prefill_s'] / u['prefill_s']:.2f}x** | {o['decode_tok_s']:.1f} | {u['decode_tok_s']:.1f} "
                f"| **{u['decode_tok_s'] / o['decode_tok_s']:.2f}x** | {o['peak_mib']:.0f} | {u['peak_mib']:.0f} "
                f"| **{u['peak_mib'] / max(o['peak_mib'], 1e-9):.2f}** | {'yes' if same else 'NO'} |"
            )
            print(rows[-1], flush=True)

    header = (
        "| shots | batch | prompt tokens | prefill ms (orig) | prefill ms (ours) | prefill speed-up "
        "| decode tok/s (orig) | decode tok/s (ours) | decode speed-up | peak MiB (orig) | peak MiB (ours) "
        "| peak ours/orig | same tokens |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    s = SIZES[args.size]
    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    )
    text = (
        f"## Generation: `{args.size}` ({args.device}, {args.dtype}, {args.cache} cache)\n\n"
        f"Model: MPT LM {s['lm_width']} wide x {s['lm_layers']} layers, CLIP {s['vision_width']} wide x "
        f"{s['vision_layers']} layers at 224 px (256 tokens), cross-attention every 4 layers, 64 latents, vocabulary "
        f"{VOCAB_9B}; greedy, {args.new_tokens} new tokens; best of {args.repeats}.\n\n"
        f"Machine: {machine}. Versions: torch {torch.__version__}, transformers {version('transformers')}, "
        f"open-flamingo {version('open-flamingo')}, open_clip {version('open_clip_torch')}.\n\n"
        f"Speed-ups are original time / ours (higher is better); peak memory is ours / original (lower is better).\n\n"
        f"{header}\n" + "\n".join(rows) + "\n"
    )
    print("\n" + text)
    out = Path(args.out)
    previous = out.read_text() if out.exists() else ""
    marker = f"## Generation: `{args.size}` ({args.device}, {args.dtype}, {args.cache} cache)"
    kept = [block for block in previous.split("\n## ") if block and not ("## " + block).startswith(marker)]
    kept = [b if b.startswith("#") else "## " + b for b in kept]
    out.write_text("\n".join(kept + [text]) if kept else "# Benchmarks\n\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
