"""Offline end-to-end demo: release-layout inputs -> conversion CLI -> from_pretrained -> few-shot generation.

    python -m modeling_flamingo.demo [--output-dir DIR]

1. Builds a tiny random OpenFlamingo-3B look-alike (a MosaicGPT language model, a CLIP tower at 224 px, the released
   resampler and cross-attention shapes, a byte-level BPE tokenizer) and writes its inputs in the layouts of a
   release: the language model as a hub-style folder, the CLIP tower as a transformers folder, and a `checkpoint.pt`
   holding the trainable parameters under the original module names, as the released files do.
2. Converts them with `python -m modeling_flamingo.convert` (in a subprocess, as a user would).
3. Loads the converted folder with `FlamingoForConditionalGeneration` and `FlamingoProcessor`, checks that it
   reproduces the source model's logits, and generates from an interleaved two-shot prompt.

Everything is written to `DIR` (default `./openflamingo-demo`) and kept: the converted model is `DIR/converted`, and
the demo ends by printing a command that loads it. A rerun replaces the demo's own earlier output in `DIR` (marked by
a `.openflamingo-demo` file) and refuses a `DIR` that holds anything else.

Nothing is downloaded. The weights are random, so the generated words are too; the point is the pipeline.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from modeling_flamingo import FlamingoForConditionalGeneration, FlamingoProcessor
from modeling_flamingo.convert.mapping import original_key
from modeling_flamingo.testing import add_flamingo_tokens, make_tiny_tokenizer, tiny_text_config, tiny_vision_config


def _step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def build_source_model(tokenizer) -> FlamingoForConditionalGeneration:
    """The tiny model whose parts become the release-layout inputs (random weights, gates opened)."""
    from modeling_flamingo import FlamingoConfig

    text = tiny_text_config("mosaic_gpt")
    text.vocab_size = len(tokenizer)
    config = FlamingoConfig(
        vision_config=tiny_vision_config(image_size=224).to_dict(),
        text_config=text.to_dict(),
        cross_attn_every_n_layers=1,
        media_token_id=tokenizer.encode("<image>")[-1],
        eoc_token_id=tokenizer.encode("<|endofchunk|>")[-1],
    )
    torch.manual_seed(0)
    model = FlamingoForConditionalGeneration(config).eval()
    with torch.no_grad():
        for block in model.gated_cross_attn_layers:  # a fresh model's gates are closed: open them
            block.attn_gate.fill_(0.8)
            block.ff_gate.fill_(0.5)
    return model


def write_release_inputs(model: FlamingoForConditionalGeneration, tokenizer, base_tokenizer, root: Path) -> dict:
    """Write `checkpoint.pt`, the language model folder and the CLIP folder as a release would have them."""
    state = model.state_dict()
    # checkpoint.pt: what OpenFlamingo trained (resampler, cross-attention) plus every "embed" parameter.
    trainable = {
        original_key(k): v.clone()
        for k, v in state.items()
        if k.startswith("perceiver.")
        or (
            k.startswith("language_model.")
            and (".gated_cross_attn_layer." in k or "embed" in k or k.endswith(".wte.weight"))
        )
    }
    torch.save(trainable, root / "checkpoint.pt")

    # The language model as on the hub: its own names, embeddings of the original vocabulary size.
    lm = type(model.language_model)(model.config.text_config)
    layers = model.config.decoder_layers_attr_name + "."
    lm_state = {}
    for k, v in state.items():
        if k.startswith("language_model.") and ".gated_cross_attn_layer." not in k:
            k = k[len("language_model.") :]
            if k.startswith(layers):
                index, rest = k[len(layers) :].split(".", 1)
                k = f"{layers}{index}.{rest.removeprefix('decoder_layer.')}"
            lm_state[k] = v
    lm_state["transformer.wte.weight"] = lm_state["transformer.wte.weight"][: len(base_tokenizer)]
    lm.config.vocab_size = len(base_tokenizer)
    lm.resize_token_embeddings(len(base_tokenizer))
    lm.load_state_dict(lm_state)
    lm.save_pretrained(root / "language_model")
    base_tokenizer.save_pretrained(root / "language_model")

    model.vision_encoder.save_pretrained(root / "clip")
    return {"checkpoint": root / "checkpoint.pt", "language_model": root / "language_model", "clip": root / "clip"}


def synthetic_images(seed: int = 0) -> list[Image.Image]:
    """Three small RGB pictures of different sizes (the processor resizes and crops them as open_clip does)."""
    rng = np.random.default_rng(seed)
    sizes = [(320, 240), (200, 300), (256, 256)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


DEFAULT_OUTPUT_DIR = "openflamingo-demo"
# Written into the output folder first, so that a rerun knows the folder is the demo's own to replace.
MARKER = ".openflamingo-demo"


def prepare_output_dir(folder: Path) -> None:
    """Make `folder` an empty folder holding only the marker; replace it only if it is the demo's own earlier output.

    Raises:
        ValueError: `folder` is a file, or a non-empty folder without the marker (not written by this demo).
    """
    if folder.exists():
        if not folder.is_dir():
            raise ValueError(f"{folder} exists and is not a folder; choose another --output-dir.")
        if any(folder.iterdir()):
            if not (folder / MARKER).is_file():
                raise ValueError(
                    f"{folder} is not empty and was not written by this demo; it is left alone: choose another "
                    "--output-dir (or an empty or missing folder)."
                )
            shutil.rmtree(folder)  # the demo's own earlier output
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text("Written by `python -m modeling_flamingo.demo`; a rerun replaces this folder.\n")


def usage_command(converted: Path) -> list[str]:
    """A command (argv) that loads the converted folder and generates from one image, for the user to paste."""
    path = json.dumps(str(converted))  # a Python string literal in double quotes: the shell quoting stays simple
    code = (
        "from PIL import Image; "
        "from modeling_flamingo import FlamingoForConditionalGeneration, FlamingoProcessor; "
        f"processor = FlamingoProcessor.from_pretrained({path}); "
        f"model = FlamingoForConditionalGeneration.from_pretrained({path}); "
        'inputs = processor(images=[Image.new("RGB", (300, 200), "red")], text="<image>Output:", return_tensors="pt"); '
        "out = model.generate(**inputs, max_new_tokens=8); "
        'print(processor.batch_decode(out, skip_special_tokens=True, prompt_length=inputs["input_ids"].shape[1]))'
    )
    return [sys.executable, "-c", code]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Offline OpenFlamingo conversion + generation demo.")
    parser.add_argument(
        "--output-dir",
        default=DEFAULT_OUTPUT_DIR,
        help=f"where to write the inputs and the converted model, kept afterwards (default: ./{DEFAULT_OUTPUT_DIR}); "
        "a rerun replaces the demo's own earlier output there, and any other non-empty folder is refused",
    )
    args = parser.parse_args(argv)
    workdir = Path(args.output_dir).resolve()
    try:
        prepare_output_dir(workdir)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    _step(f"1. tiny release-layout inputs, in {workdir}")
    base_tokenizer = make_tiny_tokenizer()
    tokenizer = add_flamingo_tokens(make_tiny_tokenizer())
    source = build_source_model(tokenizer)
    inputs = write_release_inputs(source, tokenizer, base_tokenizer, workdir)
    for name, path in inputs.items():
        print(f"   {name}: {path}")

    _step("2. convert with the CLI")
    out = workdir / "converted"
    cmd = [
        sys.executable, "-m", "modeling_flamingo.convert",
        "--checkpoint", str(inputs["checkpoint"]),
        "--vision-model", str(inputs["clip"]),
        "--language-model", str(inputs["language_model"]),
        "--cross-attn-every-n-layers", "1",
        "--output-dir", str(out),
    ]  # fmt: skip
    print("   $ " + shlex.join(cmd))
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"   converted in {time.perf_counter() - start:.1f}s: {sorted(p.name for p in out.iterdir())}")

    _step("3. load the converted folder and generate")
    processor = FlamingoProcessor.from_pretrained(out)
    model = FlamingoForConditionalGeneration.from_pretrained(out).eval()
    images = synthetic_images()
    prompt = "<image>Output: two cats sleeping.<|endofchunk|><image>Output: a sink.<|endofchunk|><image>Output:"
    batch = processor(images=[images], text=[prompt], return_tensors="pt")
    print(f"   input_ids {tuple(batch['input_ids'].shape)}, pixel_values {tuple(batch['pixel_values'].shape)}")
    with torch.no_grad():
        converted = model(**batch).logits
        reference = source(**batch).logits
    diff = (converted - reference).abs().max().item()
    print(f"   converted vs source model, max logit difference: {diff:.2e}")
    if diff > 1e-4:
        raise SystemExit("the converted model does not reproduce the source model")
    with torch.no_grad():
        out_ids = model.generate(**batch, max_new_tokens=12, num_beams=2)
    text = processor.batch_decode(out_ids, skip_special_tokens=True, prompt_length=batch["input_ids"].shape[1])
    print(f"   prompt: {prompt!r}")
    print(f"   generated (random weights): {text[0]!r}")
    print("\ndemo finished: conversion and generation work offline.")
    print(f"The converted model is kept in {out} (a rerun replaces {workdir}). Load it and generate:")
    print("   $ " + shlex.join(usage_command(out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
