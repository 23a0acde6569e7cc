"""`python -m modeling_flamingo.app` / `openflamingo-app`: the web demo.

Bad input (a model that does not load, a missing word list, a missing package) prints one `error: ...` line and
exits 1; nothing is served.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from modeling_flamingo.app.engine import DEFAULT_MAX_IMAGES
from modeling_flamingo.processing.image_loading import DEFAULT_MAX_IMAGE_PIXELS
from modeling_flamingo.weight_dtypes import SHORT_DTYPES


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="openflamingo-app", description="OpenFlamingo web demo (Gradio).")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--model",
        help="A converted model folder, or a hub id (an original OpenFlamingo release is "
        "downloaded and converted once, as from_pretrained does).",
    )
    which.add_argument(
        "--tiny",
        action="store_true",
        help="The offline tiny model of `python -m modeling_flamingo.demo` "
        "(random weights: it shows the app, not the model's quality); the default when no --model is given.",
    )
    p.add_argument("--precision", default="fp32", choices=tuple(SHORT_DTYPES), help="Weights dtype (default fp32).")
    p.add_argument(
        "--device_map", default=None, help='e.g. "auto" to spread a large model over the available devices.'
    )
    p.add_argument("--host", default="127.0.0.1", help="Interface to serve on (0.0.0.0 for every interface).")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument(
        "--content_filter",
        default="default",
        help="none, default (the alt-profanity-check classifier) or "
        "the path of a word list (one word or phrase per line).",
    )
    p.add_argument(
        "--max_concurrency",
        type=_positive_int,
        default=1,
        help="Generations at once (default 1); more requests wait in the queue.",
    )
    p.add_argument(
        "--max_images",
        type=_positive_int,
        default=DEFAULT_MAX_IMAGES,
        help=f"Most images per prompt (default {DEFAULT_MAX_IMAGES}).",
    )
    p.add_argument(
        "--max_image_pixels",
        type=_positive_int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        help=f"Largest uploaded image, in pixels, checked before decoding (default {DEFAULT_MAX_IMAGE_PIXELS:,}).",
    )
    return p


def tiny_model():
    """The offline demo's tiny model and a processor for it (random weights, nothing downloaded)."""
    from modeling_flamingo import FlamingoProcessor
    from modeling_flamingo.demo import build_source_model
    from modeling_flamingo.testing import add_flamingo_tokens, make_tiny_tokenizer

    tokenizer = add_flamingo_tokens(make_tiny_tokenizer())
    return build_source_model(tokenizer), FlamingoProcessor(tokenizer=tokenizer)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a lab server
    try:
        import gradio  # noqa: F401

        from modeling_flamingo.app.content_filter import load_content_filter
    except ImportError as error:
        print(f"error: the app needs {error.name}: pip install 'openflamingo-transformers[app]'", file=sys.stderr)
        return 1
    try:
        content_filter = load_content_filter(args.content_filter)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    from modeling_flamingo.app.engine import FlamingoEngine, load_model
    from modeling_flamingo.app.ui import build_demo

    if args.model is None:
        note = "" if args.tiny else "no --model given: "
        print(
            f"{note}Building the offline tiny model (random weights); --model PATH_OR_ID serves a real one...",
            flush=True,
        )
        model, processor = tiny_model()
    else:
        print(
            f"Loading {args.model} ({args.precision}, device_map={args.device_map}); a hub id is downloaded first, and "
            "an original OpenFlamingo release converted once into the local cache...",
            flush=True,
        )
        try:
            model, processor = load_model(args.model, args.precision, args.device_map)
        except (OSError, ValueError) as error:
            print(f"error: cannot load --model {args.model}: {error}".splitlines()[0], file=sys.stderr)
            return 1
    engine = FlamingoEngine(model, processor, max_images=args.max_images, max_image_pixels=args.max_image_pixels)
    demo = build_demo(engine, content_filter, max_concurrency=args.max_concurrency)
    # The app's own log (failed and stopped generations) goes to the console; other libraries keep their levels.
    log = logging.getLogger("modeling_flamingo.app")
    log.setLevel(logging.INFO)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    filter_name = {"none": "no content filter", "default": "content filter: alt-profanity-check"}.get(
        args.content_filter, f"content filter: word list {args.content_filter}"
    )
    print(f"Model ready ({filter_name}, {args.max_concurrency} generation(s) at once).", flush=True)
    demo.launch(server_name=args.host, server_port=args.port, show_error=True)
    return 0
