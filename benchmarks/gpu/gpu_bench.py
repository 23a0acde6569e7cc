"""The GPU measurements of `benchmarks/gpu/run.sh`, one part per call; each writes a markdown fragment.

    python benchmarks/gpu/gpu_bench.py numerics --fragment numerics.md          # bf16 against fp32 and the original
    python benchmarks/gpu/gpu_bench.py nine-b --fragment nine_b.md              # 9B shapes: MPT decode, device map
    python benchmarks/gpu/gpu_bench.py nine-b-compiled --fragment compiled.md   # 9B size: compiled decode, LLaMA

`--dry-run` runs a part on the CPU at tiny sizes (fp32 in place of bf16, aot_eager in place of inductor), so the
whole script is known to work before GPU time is spent; the numbers it writes mean nothing.

- numerics: `bench_generation.build_pair("scaled9b")` (the original and ours on the same random weights) on the GPU,
  a 4-shot prompt, batch 2. Ours in bf16 against ours in fp32, and against the original in bf16: top-1 agreement
  of the logits at every real prompt position, their largest absolute difference, and whether 16 greedy tokens are
  the same.
- nine-b: ours with the released 9B's shapes (CLIP ViT-L/14 into MPT-7B, cross-attention every 4 layers, the 9B's
  vocabulary; random weights, gates closed as a fresh model's, so the tokens are meaningless but every layer runs),
  bf16. Eager decode tokens/s at batch 1 and 8 after a 4-shot prompt (static cache), each against the
  memory-bandwidth bound: every weight of the language model and its cross-attention blocks plus the keys/values in
  the caches read once per step, at the bandwidth the GPU's name says (H100 SXM 3.35 TB/s, H200 4.8 TB/s). Then the
  model saved and loaded back with `device_map="auto"` and `max_memory={0: "22GiB", "cpu": ...}` and
  `torch.cuda.max_memory_allocated` while it generates after a 32-shot prompt.
- nine-b-compiled: transformers' `MptAttention` slices its cache by a data-dependent length, so MPT cannot be
  compiled whole; this part builds the same model with a LLaMA language model of MPT-7B's width, depth, heads and
  vocabulary (`bench_generation.llama_twin`) and measures its decode eager and compiled (inductor with CUDA graphs,
  `fullgraph=True`, static cache) at batch 1 and 8, against the same bound, with whether the tokens are the same.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

import bench_generation as gen  # noqa: E402

from modeling_flamingo import FlamingoConfig, FlamingoForConditionalGeneration  # noqa: E402
from modeling_flamingo.testing import add_flamingo_tokens, make_tiny_tokenizer  # noqa: E402

# Peak memory bandwidth by GPU name (the SXM parts; an H100 PCIe has 2.0 TB/s).
BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12}

# The released 9B: MPT-7B and CLIP ViT-L/14 at 224 px. The dry run keeps the layout at a size a CPU runs in seconds.
NINE_B = dict(lm_width=4096, lm_layers=32, lm_heads=32, vision_width=1024, vision_layers=24, vision_heads=16)
TINY = dict(lm_width=64, lm_layers=4, lm_heads=4, vision_width=32, vision_layers=1, vision_heads=2)
REPEATS = 2  # decode timings: best of this many generate calls


def bandwidth(device: torch.device) -> tuple[float | None, str]:
    """Bytes/s assumed for the decode bound, and the words saying so."""
    if device.type != "cuda":
        return None, "no bound (CPU dry run)"
    name = torch.cuda.get_device_name(device)
    for key, value in BANDWIDTH.items():
        if key in name:
            return value, f"{name}: {value / 1e12:.2f} TB/s assumed"
    return None, f"{name}: bandwidth unknown, no bound"


@contextlib.contextmanager
def building_on(device: torch.device, dtype: torch.dtype):
    """Models built inside are initialised directly on `device` in `dtype` (no full-size fp32 copy on the CPU)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def nine_b_config(shape: dict) -> tuple[FlamingoConfig, object]:
    """(config, tokenizer): the 9B's layout (MPT language model) at `shape`'s sizes, with the tiny tokenizer's ids."""
    tokenizer = add_flamingo_tokens(make_tiny_tokenizer())
    text, vision = gen.scaled_configs(shape)
    config = FlamingoConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        cross_attn_every_n_layers=4,
        media_token_id=tokenizer.encode("<image>")[-1],
        eoc_token_id=tokenizer.encode("<|endofchunk|>")[-1],
    )
    return config, tokenizer


def nine_b_model(shape: dict, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer): ours with `shape` (MPT language model), random weights initialised on `device` in `dtype`."""
    config, tokenizer = nine_b_config(shape)
    with building_on(device, dtype):
        model = FlamingoForConditionalGeneration(config)
    return model.eval(), tokenizer


def decode_bytes_per_step(model, batch: int, context: int, dtype: torch.dtype) -> float:
    """Bytes a decoding step must read at least: the language model's weights (cross-attention blocks included; the
    tied embedding once, as the output head) and every layer's keys/values for `context` tokens, plus the
    cross-attention keys/values of the current image."""
    weights = sum(p.numel() for p in model.language_model.parameters()) * dtype.itemsize
    text = model.config.text_config
    kv = 2 * text.num_hidden_layers * batch * context * text.hidden_size * dtype.itemsize
    inner = model.config.cross_attn_heads * model.config.cross_attn_head_dim
    xkv = 2 * model.config.num_cross_attn_layers * batch * model.config.perceiver_num_latents * inner * dtype.itemsize
    return weights + kv + xkv


def part_numerics(args, device: torch.device) -> str:
    low = torch.float32 if args.dry_run else torch.bfloat16
    torch.manual_seed(0)
    original, ours, tokenizer = gen.build_pair("scaled9b" if not args.dry_run else "tiny")
    cell = gen.Cell(tokenizer, shots=4, batch=2, device=device, dtype=torch.float32, cache="dynamic")
    results = {}
    with torch.no_grad():
        ours.to(device, torch.float32)
        reference_logits = ours(input_ids=cell.enc.input_ids, pixel_values=cell.pixels).logits.float()
        reference_tokens = cell.generate("ours", ours, 16)
        ours.to(low)
        original.to(device, low).eval()
        pixels = cell.pixels.to(low)
        cell.pixels = pixels
        logits = {
            "ours": ours(input_ids=cell.enc.input_ids, pixel_values=pixels).logits.float(),
            "original": original(pixels, cell.enc.input_ids).logits.float(),
        }
        tokens = {"ours": cell.generate("ours", ours, 16), "original": cell.generate("original", original, 16)}
    rows = [
        ("ours bf16 / ours fp32", logits["ours"], reference_logits, tokens["ours"], reference_tokens),
        ("ours bf16 / original bf16", logits["ours"], logits["original"], tokens["ours"], tokens["original"]),
    ]
    lines = []
    for name, a, b, ta, tb in rows:
        agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
        lines.append(
            f"| {name} | {agree:.4f} | {(a - b).abs().max().item():.3g} | {'yes' if torch.equal(ta, tb) else 'NO'} |"
        )
        results[name] = agree
    dtype_name = "fp32 (dry run)" if args.dry_run else "bf16"
    return (
        f"## bf16 numerics (`{'tiny' if args.dry_run else 'scaled9b'}`, {device.type}, {dtype_name})\n\n"
        "Same random weights in both implementations; a 4-shot prompt, batch 2: top-1 agreement of the logits at "
        "every prompt position, their largest absolute difference, and 16 greedy tokens.\n\n"
        "| comparison | top-1 agreement | max logit difference | same greedy tokens |\n|---|---|---|---|\n"
        + "\n".join(lines)
        + "\n"
    )


DECODE_HEADER = (
    "| language model | decode | batch | prompt tokens | tok/s | GB read per step | bound tok/s | fraction of bound "
    "| same tokens as eager |\n|---|---|---|---|---|---|---|---|---|"
)


def decode_row(lm: str, mode: str, cell, model, tok_s: float, args, dtype, bytes_per_s: float | None, same: str):
    """One row of `DECODE_HEADER`: `tok_s` against the memory-bandwidth bound of `model` decoding `cell`."""
    step_bytes = decode_bytes_per_step(model, cell.batch, cell.prompt_len + args.new_tokens, dtype)
    bound = cell.batch * bytes_per_s / step_bytes if bytes_per_s else None
    row = (
        f"| {lm} | {mode} | {cell.batch} | {cell.prompt_len} | {tok_s:.1f} | {step_bytes / 1e9:.2f} "
        f"| {f'{bound:.1f}' if bound else 'n/a'} | {f'{tok_s / bound:.0%}' if bound else 'n/a'} | {same} |"
    )
    print(row, flush=True)
    return row


def eager_decode_tok_s(cell, model, new_tokens: int, device: torch.device, repeats: int) -> float:
    """Best-of-`repeats` greedy decode tokens/s of `model` on `cell` (first to last token's logits)."""
    best = float("inf")
    for _ in range(repeats):
        timer = gen.StepTimer(device)
        cell.generate("ours", model, new_tokens, timer)
        best = min(best, timer.stamps[-1] - timer.stamps[0])
    return cell.batch * (new_tokens - 1) / best


def part_nine_b(args, device: torch.device) -> str:
    """The 9B's layout with its own language model, MPT: eager decode, and loading under `device_map="auto"`."""
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    shape = TINY if args.dry_run else NINE_B
    t = time.perf_counter()
    model, tokenizer = nine_b_model(shape, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    built_s = time.perf_counter() - t
    bytes_per_s, assumed = bandwidth(device)

    rows = []
    for batch in (1, 8):
        cell = gen.Cell(tokenizer, shots=4, batch=batch, device=device, dtype=dtype, cache="static")
        tok_s = eager_decode_tok_s(cell, model, args.new_tokens, device, REPEATS)
        rows.append(decode_row("MPT", "eager", cell, model, tok_s, args, dtype, bytes_per_s, "n/a"))

    # device_map="auto" under a 22 GiB budget on GPU 0, from a saved folder as a user loads it.
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        del model
        gc.collect()
        budget = {"cpu": "100GiB"} if device.type != "cuda" else {0: "22GiB", "cpu": "100GiB"}
        mapped = FlamingoForConditionalGeneration.from_pretrained(
            tmp, device_map="auto", max_memory=budget, dtype=dtype
        )
        # transformers sets hf_device_map only when the map spans more than one device.
        placements = sorted({str(v) for v in getattr(mapped, "hf_device_map", {"": device.type}).values()})
        cell = gen.Cell(tokenizer, shots=32, batch=1, device=device, dtype=dtype, cache="dynamic")
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        cell.generate("ours", mapped, args.new_tokens)
        generate_s = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")

    return (
        f"## 9B shapes: MPT (`{'tiny' if args.dry_run else '9b'}`, {device.type}, {dtype})\n\n"
        f"Ours with {params / 1e9:.2f} B parameters ({'tiny layout, dry run' if args.dry_run else 'ViT-L/14 + MPT-7B'}"
        f", random weights, built in {built_s:.0f} s). Decode: greedy, {args.new_tokens} new tokens after a 4-shot "
        f"prompt, static cache, eager, best of {REPEATS} (transformers' `MptAttention` slices its cache by a "
        f"data-dependent length, so MPT cannot be compiled whole: the next section compiles a LLaMA twin of the same "
        f"size); bound = batch x bandwidth / bytes read per step (weights of the language model and its "
        f"cross-attention blocks, the caches' keys/values); {assumed}.\n\n"
        + DECODE_HEADER
        + "\n"
        + "\n".join(rows)
        + "\n\n"
        + f'`device_map="auto"`, `max_memory={budget}`: placements {", ".join(placements)}; after a 32-shot prompt '
        f"({cell.prompt_len} tokens, 33 images), batch 1, {args.new_tokens} new tokens in {generate_s:.1f} s; "
        f"`torch.cuda.max_memory_allocated`: "
        + (f"**{peak:.2f} GiB**" if device.type == "cuda" else "n/a (CPU dry run)")
        + ".\n"
    )


def part_nine_b_compiled(args, device: torch.device) -> str:
    """Compiled against eager decode at the 9B's size, on a LLaMA twin of its MPT language model."""
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    shape = TINY if args.dry_run else NINE_B
    # Inductor on the GPU; the CPU dry run traces the same whole-step graph with aot_eager (no C++ compilation).
    backend = "aot_eager" if args.dry_run else "inductor"
    t = time.perf_counter()
    mpt_config, tokenizer = nine_b_config(shape)
    with building_on(device, dtype):
        model = gen.llama_twin(mpt_config, shape)
    params = sum(p.numel() for p in model.parameters())
    built_s = time.perf_counter() - t
    bytes_per_s, assumed = bandwidth(device)

    rows, failures = [], []
    for batch in (1, 8):
        cell = gen.Cell(tokenizer, shots=4, batch=batch, device=device, dtype=dtype, cache="static")
        try:
            res = gen.measure_compiled(cell, model, args.new_tokens, device, REPEATS, backend)
        except Exception as error:  # one line under the table; the other batch size still runs
            failures.append(f"batch {batch}: `{type(error).__name__}: {str(error).splitlines()[0]}`")
            print(f"compiled decode failed at batch {batch}: {failures[-1]}", flush=True)
            continue
        same = "yes" if res["same_tokens"] else "NO"
        for mode in ("eager", "compiled"):
            tok_s = res[mode]["decode_tok_s"]
            rows.append(decode_row("LLaMA twin", mode, cell, model, tok_s, args, dtype, bytes_per_s, same))

    return (
        f"## 9B shapes: compiled decoding, LLaMA twin (`{'tiny' if args.dry_run else '9b'}`, {device.type}, "
        f"{dtype})\n\n"
        f"The previous section's model with a LLaMA language model in place of MPT (`bench_generation.llama_twin`: "
        f"MPT's width, depth, heads and vocabulary, feed-forward 4x the width in LLaMA's three projections; "
        f"{params / 1e9:.2f} B parameters, random weights, built in {built_s:.0f} s), since MPT cannot be compiled "
        f"whole. Greedy, {args.new_tokens} new tokens after a 4-shot prompt, static cache; eager against compiled "
        f"(`torch.compile` through transformers' `compile_config`, `fullgraph=True`, "
        + ("aot_eager in this CPU dry run" if args.dry_run else "inductor with CUDA graphs (`reduce-overhead`)")
        + f"), best of {REPEATS}, alternating, after one untimed compiled call per batch size; bound as in the "
        f"previous section; {assumed}.\n\n"
        + DECODE_HEADER
        + "\n"
        + "\n".join(rows)
        + "\n"
        + ("\nCompiled decoding failed: " + "; ".join(failures) + ".\n" if failures else "")
    )


PARTS = {"numerics": part_numerics, "nine-b": part_nine_b, "nine-b-compiled": part_nine_b_compiled}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("part", choices=sorted(PARTS))
    p.add_argument("--fragment", required=True, help="markdown file this part writes")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, fp32, aot_eager in place of inductor")
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args(argv)
    if args.dry_run:
        args.new_tokens = min(args.new_tokens, 4)
    elif not torch.cuda.is_available():
        print("gpu_bench.py: no CUDA device; run with --dry-run on a CPU.", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    text = PARTS[args.part](args, device)
    print(text)
    Path(args.fragment).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
