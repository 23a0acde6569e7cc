"""Load time: `from_pretrained` of a converted folder vs the original's assembly, on the same weights.

    .venv-test/bin/python benchmarks/bench_load.py [--lm-width 1024 --lm-layers 16]

The original is assembled as its README instructs: `create_model_and_transforms` (an open_clip vision tower with its
weights, the language model with `AutoModelForCausalLM.from_pretrained`, the tokenizer, the Flamingo layers), then
`model.load_state_dict(torch.load("checkpoint.pt"), strict=False)`. Ours is `FlamingoForConditionalGeneration.
from_pretrained(folder)` on the output of `python -m modeling_flamingo.convert` for those same files, plus
`FlamingoProcessor.from_pretrained(folder)`. Both are timed warm (files in the page cache), alternating, best of N,
and must give the same logits afterwards. The table goes to benchmarks/RESULTS.md (section "Load time").
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from unittest import mock

import torch
from transformers import AutoModelForCausalLM, CLIPVisionConfig, MptConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from convert_helpers import base_tokenizer, checkpoint_state_dict, lm_state_dict, save_open_clip  # noqa: E402

from reference import build_original, random_pixels, tiny_open_clip  # noqa: E402


def write_inputs(root: Path, lm_width: int, lm_layers: int, vision_width: int, vision_layers: int):
    text = MptConfig(
        d_model=lm_width, n_heads=lm_width // 64, n_layers=lm_layers, max_seq_len=2048, vocab_size=336,
        attn_config={"alibi": True}, use_cache=True,
    )  # fmt: skip
    vision = CLIPVisionConfig(
        hidden_size=vision_width, intermediate_size=4 * vision_width, num_hidden_layers=vision_layers,
        num_attention_heads=vision_width // 64, patch_size=14, image_size=224, hidden_act="quick_gelu",
    )  # fmt: skip
    original, tokenizer = build_original("mpt", cross_attn_every_n_layers=4, text_config=text, vision_config=vision)
    torch.save(checkpoint_state_dict(original, "mpt"), root / "checkpoint.pt")
    # The factory shrank the config's vocabulary to the tokenizer; the hub-style folder keeps the LM's own rows.
    lm = AutoModelForCausalLM.from_config(MptConfig.from_dict({**text.to_dict(), "vocab_size": 336}))
    lm.load_state_dict(lm_state_dict(original, "mpt"), strict=False)
    lm.save_pretrained(root / "lm")
    base_tokenizer("mpt").save_pretrained(root / "lm")
    save_open_clip(original, root / "vision.pt")
    return original, tokenizer, text, vision


def load_original(root: Path, tokenizer, text, vision):
    from open_flamingo.src import factory

    def clip_with_weights(*args, **kwargs):
        clip = tiny_open_clip(0, vision)
        clip.visual.load_state_dict(torch.load(root / "vision.pt", weights_only=True))
        return clip, None, None

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(factory.open_clip, "create_model_and_transforms", clip_with_weights))
        stack.enter_context(
            mock.patch.object(
                factory.open_clip, "get_model_config", lambda *a, **k: {"vision_cfg": {"width": vision.hidden_size}}
            )
        )
        stack.enter_context(mock.patch.object(factory.AutoTokenizer, "from_pretrained", lambda *a, **k: tokenizer))
        model, _, _ = factory.create_model_and_transforms(
            "ViT-L-14", "openai", str(root / "lm"), str(root / "lm"), cross_attn_every_n_layers=4
        )
    model.load_state_dict(torch.load(root / "checkpoint.pt", weights_only=True), strict=False)
    return model.eval()


def load_ours(folder: Path):
    from modeling_flamingo import FlamingoForConditionalGeneration, FlamingoProcessor

    FlamingoProcessor.from_pretrained(folder)
    return FlamingoForConditionalGeneration.from_pretrained(folder).eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lm-width", type=int, default=1024)
    p.add_argument("--lm-layers", type=int, default=16)
    p.add_argument("--vision-width", type=int, default=512)
    p.add_argument("--vision-layers", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = p.parse_args(argv)

    from modeling_flamingo.convert.__main__ import main as convert

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        original, tokenizer, text, vision = write_inputs(
            root, args.lm_width, args.lm_layers, args.vision_width, args.vision_layers
        )
        args_convert = ["--checkpoint", str(root / "checkpoint.pt"), "--vision-model", str(root / "vision.pt")]
        args_convert += ["--language-model", str(root / "lm"), "--output-dir", str(root / "converted"), "--quiet"]
        assert convert(args_convert) == 0
        size = sum(f.stat().st_size for f in (root / "converted").glob("*.safetensors")) / 2**30
        del original
        gc.collect()

        times = {"original": [], "ours": []}
        for _ in range(args.repeats):
            for impl in times:
                gc.collect()
                start = time.perf_counter()
                model = (
                    load_original(root, tokenizer, text, vision)
                    if impl == "original"
                    else load_ours(root / "converted")
                )
                times[impl].append(time.perf_counter() - start)
                if impl == "original":
                    reference = model
                else:
                    ours = model
        tokenizer.padding_side = "left"
        batch = tokenizer(["<image>A cat.<|endofchunk|><image>An image of"], return_tensors="pt")
        pixels = random_pixels(1, 2, size=224)
        with torch.no_grad():
            a = reference(pixels, batch.input_ids, attention_mask=batch.attention_mask).logits
            b = ours(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels).logits
        diff = (a - b).abs().max().item()

    best = {k: min(v) for k, v in times.items()}
    text_out = (
        "## Load time\n\n"
        f"Model: MPT LM {args.lm_width} wide x {args.lm_layers} layers, open_clip/CLIP tower {args.vision_width} wide x "
        f"{args.vision_layers} layers, cross-attention every 4 layers; {size:.2f} GiB of fp32 weights. Warm page cache, "
        f"best of {args.repeats}, alternating; max logit difference after loading: {diff:.1e}.\n"
        f"Versions: torch {torch.__version__}, transformers {version('transformers')}, open-flamingo "
        f"{version('open-flamingo')}, open_clip {version('open_clip_torch')}.\n\n"
        "| load | original (create_model_and_transforms + checkpoint.pt) | ours (from_pretrained of the converted folder) "
        "| speed-up |\n|---|---|---|---|\n"
        f"| seconds | {best['original']:.2f} | {best['ours']:.2f} | **{best['original'] / best['ours']:.2f}x** |\n"
    )
    print(text_out)
    assert diff < 1e-4, diff
    out = Path(args.out)
    previous = out.read_text() if out.exists() else "# Benchmarks\n"
    blocks = [b for b in previous.split("\n## ") if b and not b.startswith("Load time")]
    blocks = [b if b.startswith("#") else "## " + b for b in blocks]
    out.write_text("\n".join(blocks + [text_out]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
