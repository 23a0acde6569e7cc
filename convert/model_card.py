"""The README.md model card of a converted folder: where every part came from and how it was converted."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .plan import ConversionPlan, ConversionSpec
    from .sources import Resolved


from pathlib import Path

ROLES = {
    "checkpoint": "checkpoint.pt",
    "language_model": "language model",
    "tokenizer": "tokenizer",
    "vision_model": "vision tower",
}


def _local_name(src: Resolved) -> str:
    """The input's own name, never its location (`Path.name` of the absolute path, so `.` gives the folder's name)."""
    return Path(src.path).absolute().name


def input_record(plan: ConversionPlan) -> dict:
    """Where every input came from, without local paths: hub id and revision, or local name and file hashes."""
    record = {}
    for role, src in plan.sources.items():
        if src.repo_id is not None:
            record[role] = {"repo_id": src.repo_id, "revision": src.commit or src.revision or "main"}
        else:
            files = dict(plan.local_files.get(role, []))
            record[role] = {"local": _local_name(src), "sha256": files}
    return record


def _source_row(part: str, src: Resolved) -> str:
    if src.repo_id is None:
        kind = "file" if src.path.is_file() else "folder"
        return f"| {part} | local {kind} `{_local_name(src)}` (sha256 below) | - |"
    return f"| {part} | [{src.repo_id}](https://huggingface.co/{src.repo_id}) | `{src.commit or src.revision or 'main'}` |"


def model_card(plan: ConversionPlan, spec: ConversionSpec, shards: dict) -> str:
    """Markdown with YAML front matter. Deterministic: no dates, no output paths."""
    config = plan.config
    src = plan.sources
    ckpt = src["checkpoint"]
    title = spec.preset or (ckpt.repo_id if ckpt.repo_id else "an OpenFlamingo checkpoint")
    text = config.text_config
    vision = config.vision_config
    tokenizer = plan.tokenizer
    base = [s.repo_id for s in (ckpt,) if s.repo_id]
    lines = ["---", "library_name: transformers", "pipeline_tag: image-text-to-text", "tags:", "- openflamingo"]
    lines += ["- modeling_flamingo"]
    if base:
        lines += ["base_model:", *[f"- {b}" for b in base]]
    lines += ["---", "", f"# {title} (transformers format)", ""]
    lines += [
        "OpenFlamingo converted with `python -m modeling_flamingo.convert` for `modeling_flamingo`'s "
        "`FlamingoForConditionalGeneration` and `FlamingoProcessor`. The weights are the original ones, renamed; "
        "nothing was retrained.",
        "",
        "## Sources",
        "",
        "| part | source | revision |",
        "|---|---|---|",
        _source_row("checkpoint.pt", ckpt),
        _source_row("language model", src["language_model"]),
        _source_row("tokenizer", src["tokenizer"]),
        _source_row("vision tower", src["vision_model"]),
        "",
        f"- sha256 of the checkpoint file: `{plan.checkpoint_sha256}`",
        *[
            f"- sha256 of the local {ROLES[role]}'s `{name}`: `{digest}`"
            for role, files in plan.local_files.items()
            if role != "checkpoint"
            for name, digest in files
        ],
        f"- vision tower read from {'an open_clip state dict' if plan.vision_kind == 'open_clip' else 'an HF CLIP model'}"
        " (only the vision tower is kept).",
        "",
        "## Conversion settings",
        "",
        f"- preset: `{spec.preset}`" if spec.preset else "- preset: none (explicit inputs)",
        f"- language model: `{text.model_type}`, {text.num_hidden_layers} layers, width {text.hidden_size}, "
        f"{text.vocab_size} embedding rows",
        f"- vision tower: CLIP width {vision.hidden_size}, {vision.num_hidden_layers} layers, patch {vision.patch_size}, "
        f"{vision.image_size} px, `{vision.hidden_act}`",
        f"- gated cross-attention every {config.cross_attn_every_n_layers} decoder layer(s) "
        f"({config.num_cross_attn_layers} blocks)",
        f"- dtype: `{spec.dtype}`; max shard size: `{spec.max_shard_size}` ({len(shards)} file(s))",
        f"- token ids: `<image>` = {config.media_token_id}, `<|endofchunk|>` = {config.eoc_token_id} (generation "
        f"stops there), pad `{tokenizer.pad_token}` = {tokenizer.pad_token_id}",
    ]
    if plan.notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in plan.notes]
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "import torch",
        "from modeling_flamingo import FlamingoForConditionalGeneration, FlamingoProcessor",
        "",
        'processor = FlamingoProcessor.from_pretrained("path/to/this/folder")',
        'model = FlamingoForConditionalGeneration.from_pretrained("path/to/this/folder", dtype=torch.bfloat16)',
        'inputs = processor(images=[[image]], text=["<image>An image of"], return_tensors="pt")',
        "out = model.generate(**inputs, max_new_tokens=20)",
        "print(processor.batch_decode(out, skip_special_tokens=True))",
        "```",
        "",
    ]
    return "\n".join(lines)
