"""Command line: convert an original OpenFlamingo checkpoint into a transformers model folder.

    python -m modeling_flamingo.convert --preset openflamingo/OpenFlamingo-9B-vitl-mpt7b --output-dir DIR
    python -m modeling_flamingo.convert --checkpoint CKPT --vision-model VIS --language-model LM \\
        --tokenizer TOK --cross-attn-every-n-layers N --output-dir DIR

The flags are the fields of `ConvertArguments`, parsed with the CLIs' `FlamingoArgumentParser`
(`modeling_flamingo.arguments`): each is accepted as `--some-flag` and `--some_flag`, and `--help` shows the defaults.
Any failure (bad flags included) prints one line, `error: ...`, on stderr and exits with status 1, leaving no output
folder behind; SIGTERM removes the partial output and exits with status 143. (A bad command line keeps status 1 here,
where the other CLIs give 2: scripts written against this CLI test for 1.)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

from modeling_flamingo.arguments import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, FlamingoArgumentParser, arg
from modeling_flamingo.weight_dtypes import DTYPES

from .converter import ConversionSpec, ConversionTerminated, convert
from .hub import hub_cache_dir, offline_mode
from .presets import PRESETS
from .sources import ConversionError, HubOptions, first_line


@dataclass(kw_only=True)
class ConvertArguments:
    """The flags of `openflamingo-convert` (each accepted as `--some-flag` and `--some_flag`)."""

    preset: str | None = arg(
        None,
        help="a released model: " + ", ".join(PRESETS) + ". Other flags override its defaults "
        "(e.g. --checkpoint with a local copy of checkpoint.pt).",
        choices=sorted(PRESETS),
        metavar="REPO",
    )
    checkpoint: str | None = arg(None, help="checkpoint.pt file, folder holding it, or hub repo id")
    vision_model: str | None = arg(
        None, help="HF CLIP model (folder or repo id), or a file holding an open_clip vision state dict"
    )
    language_model: str | None = arg(None, help="the language model (transformers folder or repo id)")
    tokenizer: str | None = arg(None, help="tokenizer folder or repo id (default: the language model's)")
    cross_attn_every_n_layers: int | None = arg(
        None, help="cross-attention interval; checked against the checkpoint (read from it when omitted)"
    )
    output_dir: str = arg(help="folder to create")
    dtype: str = arg("float32", help="dtype of the weights written", choices=sorted(DTYPES))
    max_shard_size: str = arg("5GB", help="largest weight file, e.g. 5GB, 500MB")
    language_model_revision: str | None = arg(None, help="hub revision of the language model (and its tokenizer)")
    checkpoint_revision: str | None = arg(None, help="hub revision of the checkpoint repo")
    vision_model_revision: str | None = arg(None, help="hub revision of the vision model repo")
    tokenizer_revision: str | None = arg(None, help="hub revision of the tokenizer repo")
    vision_hidden_act: str = arg(
        "quick_gelu",
        help="activation of an open_clip vision tower (OpenAI CLIP weights use quick_gelu)",
        choices=["quick_gelu", "gelu"],
    )
    cache_dir: str | None = arg(None, help="hub cache folder (default: HF_HUB_CACHE)")
    offline: bool = arg(False, help="use the hub cache only (also set by HF_HUB_OFFLINE=1)")
    overwrite: bool = arg(False, help="replace a previous conversion (a folder this converter wrote)")
    allow_non_finite: bool = arg(False, help="write NaN/inf values found in the weights instead of refusing them")
    quiet: bool = arg(False, help="print nothing but errors")


class _Parser(FlamingoArgumentParser):
    """The CLIs' parser, reporting a bad command line as a ConversionError (one `error:` line, status 1, like every
    other failure of this CLI) instead of with status 2."""

    def add_argument(self, *name_or_flags: str, **kwargs: Any) -> argparse.Action:
        # The dashed spelling first: the one this CLI has always documented, and the one argparse names a flag by in
        # the usage and in errors (`the following arguments are required: --output-dir/--output_dir`).
        return super().add_argument(*sorted(name_or_flags, key=lambda name: "_" in name), **kwargs)

    def error(self, message: str) -> NoReturn:
        raise ConversionError(f"{message} (see --help)")


def build_parser() -> _Parser:
    return _Parser(
        ConvertArguments,
        prog="openflamingo-convert",
        description="Convert an original OpenFlamingo checkpoint.pt (plus its vision tower, language model and "
        "tokenizer) into a folder that FlamingoForConditionalGeneration.from_pretrained and "
        "FlamingoProcessor.from_pretrained load. Paths may be local paths or hub repo ids.",
    )


def _spec(args: ConvertArguments, parser: _Parser) -> ConversionSpec:
    common = {
        "tokenizer": args.tokenizer,
        "cross_attn_every_n_layers": args.cross_attn_every_n_layers,
        "checkpoint_revision": args.checkpoint_revision,
        "vision_model_revision": args.vision_model_revision,
        "language_model_revision": args.language_model_revision,
        "tokenizer_revision": args.tokenizer_revision,
        "dtype": args.dtype,
        "max_shard_size": args.max_shard_size,
        "vision_hidden_act": args.vision_hidden_act,
    }
    if args.preset:
        return ConversionSpec.from_preset(
            args.preset,
            checkpoint=args.checkpoint,
            vision_model=args.vision_model,
            language_model=args.language_model,
            **common,
        )
    missing = [
        f"--{n.replace('_', '-')}" for n in ("checkpoint", "vision_model", "language_model") if not getattr(args, n)
    ]
    if missing:
        parser.error(f"without --preset, {' '.join(missing)} {'is' if len(missing) == 1 else 'are'} required")
    return ConversionSpec(
        checkpoint=args.checkpoint,
        vision_model=args.vision_model,
        language_model=args.language_model,
        **{k: v for k, v in common.items() if v is not None},
    )


def _attach_dash_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`--flag -VALUE` -> `--flag=-VALUE` for flags taking one value, so that a value starting with a dash
    (`--max-shard-size -5GB`) reaches its own check instead of argparse's "expected one argument"."""
    takes_value = {
        option
        for action in parser._actions
        if action.nargs is None and action.option_strings
        for option in action.option_strings
    }
    known = {option for action in parser._actions for option in action.option_strings}
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in takes_value and i + 1 < len(argv) and argv[i + 1].startswith("-") and argv[i + 1] not in known:
            out.append(f"{token}={argv[i + 1]}")
            i += 2
            continue
        out.append(token)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the converter; returns the exit status (0 on success, 1 on a conversion error)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        (args,) = parser.parse(_attach_dash_values(parser, argv))
        # The environment is read now, not when huggingface_hub was imported.
        hub = HubOptions(cache_dir=hub_cache_dir(args.cache_dir), local_files_only=args.offline or offline_mode())
        log = (lambda message: None) if args.quiet else (lambda message: print(message, flush=True))
        spec = _spec(args, parser)
        convert(
            spec,
            args.output_dir,
            overwrite=args.overwrite,
            hub=hub,
            log=log,
            allow_non_finite=args.allow_non_finite,
        )
    except ConversionTerminated as exc:
        print("error: terminated (SIGTERM); the partial output was removed", file=sys.stderr)
        return exc.code
    except ConversionError as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # an unforeseen failure still gets one line, with its type for bug reports
        print(f"error: {type(exc).__name__}: {first_line(exc)}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
