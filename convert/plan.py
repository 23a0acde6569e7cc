"""The plan of a conversion: what to convert (`ConversionSpec`), and, read from the inputs before anything is
written, every output tensor with where it comes from (`ConversionPlan`, made by `plan_conversion`).

Planning reads only names and shapes: the config is assembled from the inputs and a `torch.device("meta")` instance
of `FlamingoForConditionalGeneration` gives the expected names and shapes; every missing, unexpected or mis-shaped
tensor is reported here, before the output folder is touched.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from modeling_flamingo.processing.processing_flamingo import EOC_TOKEN, MEDIA_TOKEN, add_flamingo_tokens
from modeling_flamingo.weight_dtypes import DTYPES

from .inputs import (
    check_tied_copy,
    checkpoint_keys,
    cross_attn_interval,
    decoder_layers_attr_name,
    embedding_names,
    file_sha256,
    language_model_config,
    load_tokenizer,
    read_vision,
)
from .mapping import (
    IGNORED_BUFFER_PATTERNS,
    flamingo_key,
    hf_clip_vision_key,
    language_model_key,
    open_clip_vision_targets,
    rename_lm_key,
)
from .presets import PRESETS, get_preset
from .sources import (
    ConversionError,
    HubOptions,
    Resolved,
    WeightFile,
    WeightFolder,
    first_line,
    resolve_checkpoint,
    resolve_model_folder,
    resolve_tokenizer_folder,
    resolve_vision,
)
from .writer import PlannedTensor


@dataclass
class ConversionSpec:
    """What to convert. Paths may be local paths or hub repo ids.

    Attributes:
        checkpoint: the original `checkpoint.pt` (file, folder holding it, or hub repo).
        vision_model: HF CLIP folder/repo, or an open_clip vision state-dict file.
        language_model: the language model's transformers folder/repo (config.json + weights).
        tokenizer: the tokenizer folder/repo; defaults to `language_model`.
        cross_attn_every_n_layers: interval of the cross-attention blocks; read from the checkpoint when None.
        dtype: output dtype of floating tensors ("float32", "bfloat16", "float16").
        max_shard_size: output shard size limit ("5GB").
        vision_hidden_act: activation of an open_clip vision tower (OpenAI weights: QuickGELU).
        preset: the release repo id this spec was built from, for the model card.
    """

    checkpoint: str
    vision_model: str
    language_model: str
    tokenizer: str | None = None
    cross_attn_every_n_layers: int | None = None
    checkpoint_revision: str | None = None
    vision_model_revision: str | None = None
    language_model_revision: str | None = None
    tokenizer_revision: str | None = None
    dtype: str = "float32"
    max_shard_size: str | int = "5GB"
    vision_hidden_act: str = "quick_gelu"
    preset: str | None = None

    @classmethod
    def from_preset(cls, repo_id: str, **overrides) -> ConversionSpec:
        """The spec of a released model; `overrides` (non-None values) replace its defaults."""
        preset = get_preset(repo_id)
        if preset is None:
            raise ConversionError(f"unknown preset {repo_id!r}; known presets: {', '.join(PRESETS)}")
        overrides = {k: v for k, v in overrides.items() if v is not None}
        language_model = overrides.pop("language_model", None) or preset.language_model
        if language_model is None:
            raise ConversionError(
                f"preset {preset.repo_id} needs the LLaMA-7B weights in transformers format: pass the folder with "
                "--language-model (and its tokenizer with --tokenizer if it is elsewhere)"
            )
        lm_revision = overrides.pop("language_model_revision", None)
        if lm_revision is None and language_model == preset.language_model:
            lm_revision = preset.language_model_revision
        values = {
            "checkpoint": preset.repo_id,
            "vision_model": preset.vision_model,
            "language_model": language_model,
            "language_model_revision": lm_revision,
            "cross_attn_every_n_layers": preset.cross_attn_every_n_layers,
            "preset": preset.repo_id,
        }
        values.update(overrides)
        return cls(**values)


@dataclass
class ConversionPlan:
    """Everything the writer needs, and what the model card reports."""

    config: object
    tokenizer: object
    tensors: list[PlannedTensor]
    total_parameters: int
    sources: dict[str, Resolved]
    checkpoint_sha256: str
    vision_kind: str
    notes: list[str] = field(default_factory=list)
    # For local inputs (no hub revision to name): role -> [(file name, sha256)] of its weight (or tokenizer) files.
    local_files: dict[str, list[tuple[str, str]]] = field(default_factory=dict)


def plan_conversion(spec: ConversionSpec, hub: HubOptions, log: Callable[[str], None]) -> ConversionPlan:
    """Locate the inputs of `spec` (hub inputs are fetched through `hub`), read their names and shapes, and give every
    tensor of the output its source; `log` receives one line per step.

    Raises:
        ConversionError: an input that is missing, unreadable or does not fit the others, with a one-line message.
    """
    # 1. Locate everything (downloads happen here).
    ckpt_src = resolve_checkpoint(spec.checkpoint, spec.checkpoint_revision, hub)
    lm_src = resolve_model_folder(spec.language_model, spec.language_model_revision, hub, "language model")
    tok_spec = spec.tokenizer or spec.language_model
    tok_revision = spec.tokenizer_revision
    if tok_revision is None and tok_spec == spec.language_model:
        tok_revision = spec.language_model_revision
    tok_src = lm_src if tok_spec == spec.language_model and lm_src.repo_id is None else None
    tok_src = tok_src or resolve_tokenizer_folder(tok_spec, tok_revision, hub)
    vision_src = resolve_vision(spec.vision_model, spec.vision_model_revision, hub)
    sources = {"checkpoint": ckpt_src, "language_model": lm_src, "tokenizer": tok_src, "vision_model": vision_src}

    # 2. The language model's config, read as JSON: no remote code runs.
    text_config = language_model_config(lm_src.path / "config.json")
    model_type = text_config.model_type
    log(f"language model: {lm_src.describe()} ({model_type}, {text_config.num_hidden_layers} layers)")
    log(f"vision model: {vision_src.describe()}; tokenizer: {tok_src.describe()}")
    layers_attr = decoder_layers_attr_name(text_config, lm_src.path / "config.json")
    num_layers = text_config.num_hidden_layers

    # 3. The checkpoint: names and shapes; aliases checked equal.
    log(f"checkpoint: {ckpt_src.describe()}")
    checkpoint = WeightFile(ckpt_src.path, "checkpoint", nested=True)
    ckpt_keys = checkpoint_keys(checkpoint, layers_attr)  # canonical original key -> stored key
    ckpt_infos = checkpoint.infos()
    ckpt_shapes = {k: tuple(ckpt_infos[stored].shape) for k, stored in ckpt_keys.items()}
    checkpoint_sha256 = file_sha256(ckpt_src.path)

    every_n = cross_attn_interval(ckpt_shapes, layers_attr, num_layers, spec.cross_attn_every_n_layers)
    emb_name, out_emb_name = embedding_names(text_config)
    emb_key = f"lang_encoder.{emb_name}"
    if emb_key not in ckpt_shapes:
        raise ConversionError(
            f"missing key {emb_key} in the checkpoint: it must hold the language model's input embeddings "
            "(with the rows of the added Flamingo tokens)"
        )
    vocab_rows = ckpt_shapes[emb_key][0]
    text_config.vocab_size = vocab_rows
    # Hub configs of MPT disable the cache for training; generation wants it.
    text_config.use_cache = True
    if model_type == "mosaic_gpt":
        # MosaicGPT's `no_bias` is not a reliable account of its weights (some copies of its code create every Linear
        # and LayerNorm with a bias whatever it says): the weight files decide.
        lm_folder = WeightFolder.find(lm_src.path, "language model file")
        has_bias = False
        for file in lm_folder:
            has_bias = has_bias or any(key.endswith(".bias") for key in file.infos())
            file.close()
        if text_config.no_bias == has_bias:
            log(
                f"MosaicGPT no_bias={text_config.no_bias} in config.json, but the weights {'have' if has_bias else 'lack'} biases: following the weights"
            )
        text_config.no_bias = not has_bias

    # 4. Tokenizer with the Flamingo tokens, added as the original factory adds them.
    tokenizer = load_tokenizer(tok_src.path)
    add_flamingo_tokens(tokenizer)
    if len(tokenizer) != vocab_rows:
        raise ConversionError(
            f"the tokenizer ({tok_src.describe()}) has {len(tokenizer)} tokens once <|endofchunk|>, <image> (and "
            f"<PAD>) are added, but the checkpoint's embeddings have {vocab_rows} rows: wrong --tokenizer or "
            "--language-model?"
        )
    media_id = tokenizer.encode(MEDIA_TOKEN)[-1]
    eoc_id = tokenizer.encode(EOC_TOKEN)[-1]

    # 5. Vision tower config and its weight source.
    vision_config, vision_files, vision_kind = read_vision(vision_src, spec.vision_hidden_act)

    log(f"cross-attention every {every_n} layers, {vocab_rows} tokens (<image> {media_id}, <|endofchunk|> {eoc_id})")

    # 6. The config, and a meta model giving every expected name and shape.
    config = _flamingo_config(vision_config, text_config, every_n, media_id, eoc_id, ckpt_shapes, spec.dtype)
    model = _meta_model(config)
    tied = set(model.all_tied_weights_keys)
    expected = {k: (tuple(t.shape), t.dtype) for k, t in model.state_dict().items() if k not in tied}
    order = {k: i for i, k in enumerate(expected)}
    lm_ignore = [
        re.compile(p) for p in (getattr(model.language_model, "_keys_to_ignore_on_load_unexpected", None) or [])
    ]
    ignore = [re.compile(p) for p in IGNORED_BUFFER_PATTERNS]
    total_parameters = sum(math.prod(s) for s, _ in expected.values())
    del model

    planner = _Planner(expected, tied, spec.dtype, lm_ignore, ignore)
    notes: list[str] = []

    # 7. Providers in priority order: the checkpoint, then the vision tower, then the language model's files.
    ckpt_vision: dict[str, str] = {}
    for canonical, stored in ckpt_keys.items():
        if canonical.startswith("vision_encoder."):
            ckpt_vision[canonical[len("vision_encoder.") :]] = stored
            continue
        try:
            ours = flamingo_key(canonical)
        except KeyError:
            raise ConversionError(f"unexpected key {stored} in the checkpoint {ckpt_src.path}") from None
        if ours is None:
            continue
        if ours.startswith("language_model."):
            ours = "language_model." + rename_lm_key(ours[len("language_model.") :], model_type)
        if ours in tied:
            check_tied_copy(checkpoint, stored, ckpt_keys.get(emb_key), ours)
            continue
        planner.add(ours, checkpoint, stored, ckpt_shapes[canonical], what=f"{stored} (checkpoint)")
    for rest, stored in ckpt_vision.items():
        _add_open_clip(planner, checkpoint, rest, stored, ckpt_shapes[f"vision_encoder.{rest}"], "checkpoint")

    if vision_kind == "open_clip":
        (file, keymap) = vision_files
        infos = file.infos()
        for rest, stored in keymap.items():
            _add_open_clip(planner, file, rest, stored, infos[stored].shape, f"vision file {file.path}")
        file.close()
    else:
        for file in vision_files:
            for key, info in file.infos().items():
                name = hf_clip_vision_key(key)
                if name is None or planner.ignorable(f"vision_encoder.{name}", key):
                    continue  # the text tower and the projection heads of a CLIPModel, known buffers
                planner.add(f"vision_encoder.{name}", file, key, info.shape, what=f"{key} ({file.path.name})")
            file.close()

    lm_files = WeightFolder.find(lm_src.path, "language model file")
    for file in lm_files:
        for key, info in file.infos().items():
            rel = rename_lm_key(key, model_type)
            ours = language_model_key(rel, layers_attr)
            if ours in tied or planner.ignorable(ours, rel, lm=True):
                continue
            resize = out_emb_name is not None and ours == f"language_model.{out_emb_name}"
            if resize and ours not in planner.provided and info.shape[0] != vocab_rows:
                notes.append(planner.add_resized_head(ours, file, key, info.shape, vocab_rows))
                continue
            planner.add(ours, file, key, info.shape, what=f"{key} ({file.path.name})")
        file.close()
    checkpoint.close()

    planner.check_complete()
    groups = {id(checkpoint): 0}
    for f in [vision_files[0]] if vision_kind == "open_clip" else vision_files:
        groups.setdefault(id(f), len(groups))
    for f in lm_files:
        groups.setdefault(id(f), len(groups))
    tensors = sorted(planner.provided.values(), key=lambda t: (groups[id(t.source)], order[t.key]))
    local_files = _local_file_hashes(sources, checkpoint_sha256)
    return ConversionPlan(
        config, tokenizer, tensors, total_parameters, sources, checkpoint_sha256, vision_kind, notes, local_files
    )


# Tokenizer files recorded (with their sha256) for a local tokenizer folder.
_TOKENIZER_FILE = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\..*|merges\.txt|.*\.model|.*\.tiktoken)$"
)


def _local_file_hashes(sources: dict[str, Resolved], checkpoint_sha256: str) -> dict[str, list[tuple[str, str]]]:
    """File names and sha256 of the local inputs' weight files (tokenizer files for a tokenizer), for the model card:
    a local path means nothing elsewhere, the hashes identify the files."""
    out: dict[str, list[tuple[str, str]]] = {}
    for role, src in sources.items():
        if src.repo_id is not None:
            continue
        if role == "checkpoint":
            out[role] = [(src.path.name, checkpoint_sha256)]
        elif src.path.is_file():
            out[role] = [(src.path.name, file_sha256(src.path))]
        elif role == "tokenizer":
            files = sorted(p for p in src.path.iterdir() if p.is_file() and _TOKENIZER_FILE.match(p.name))
            out[role] = [(p.name, file_sha256(p)) for p in files]
        else:
            out[role] = [(f.path.name, file_sha256(f.path)) for f in WeightFolder.find(src.path, "weight file")]
    return out


# Which input should hold a tensor, for "missing key" messages.
_EXPECTED_IN = (
    ("vision_encoder.", "the vision model"),
    ("perceiver.", "the checkpoint"),
    ("language_model.", "the checkpoint or the language model files"),
)


class _Planner:
    """Collects one provider per expected tensor, checking names and shapes."""

    def __init__(self, expected, tied, dtype, lm_ignore, ignore):
        self.expected: dict[str, tuple[tuple[int, ...], torch.dtype]] = expected
        self.tied = tied
        self.dtype = DTYPES[dtype]
        self.lm_ignore = lm_ignore
        self.ignore = ignore
        self.provided: dict[str, PlannedTensor] = {}

    def ignorable(self, ours: str, original: str, lm: bool = False) -> bool:
        """An unexpected name transformers would also skip (known buffers, the LM class's ignore patterns)."""
        if ours in self.expected:
            return False
        patterns = self.ignore + (self.lm_ignore if lm else [])
        return any(p.search(original) for p in patterns)

    def _out_dtype(self, ours: str) -> torch.dtype:
        dtype = self.expected[ours][1]
        return self.dtype if dtype.is_floating_point else dtype

    def add(self, ours: str, file: WeightFile, key: str, shape: tuple[int, ...], what: str, chunk: int | None = None):
        if ours not in self.expected:
            raise ConversionError(f"unexpected key {what}: the model has no {ours}")
        if ours in self.provided:
            return  # a higher-priority input already gives it
        stored_shape = tuple(shape)
        if chunk is not None:
            stored_shape = (stored_shape[0] // 3, *stored_shape[1:])
        want = self.expected[ours][0]
        if stored_shape != want:
            raise ConversionError(
                f"shape mismatch for {what}: it is {list(stored_shape)} but the model's {ours} is {list(want)}"
            )
        if chunk is None:
            read = _reader(file, key)
        else:
            offset = chunk * want[0]
            read = _reader(file, key, offset)
        self.provided[ours] = PlannedTensor(ours, want, self._out_dtype(ours), read, file, origin=what)

    def add_resized_head(self, ours: str, file: WeightFile, key: str, shape: tuple[int, ...], rows: int) -> str:
        """An output embedding with a different row count than the vocabulary (the v1 LLaMA checkpoint keeps only
        the input embeddings): extra rows get the mean of the pretrained rows, surplus rows are dropped."""
        want = self.expected[ours][0]
        if tuple(shape[1:]) != tuple(want[1:]):
            raise ConversionError(
                f"shape mismatch for {key} ({file.path.name}): {list(shape)} vs the model's {list(want)}"
            )
        stored = shape[0]
        state: dict[str, torch.Tensor] = {}

        def mean_row() -> torch.Tensor:
            if "mean" not in state:
                total = torch.zeros(shape[1:], dtype=torch.float64)
                step = max(1, (64 << 20) // (8 * max(1, math.prod(shape[1:]))))
                for i in range(0, stored, step):
                    total += file.read(key, i, min(i + step, stored)).to(torch.float64).sum(0)
                state["mean"] = (total / stored).to(torch.float32)
            return state["mean"]

        def read(start: int | None, stop: int | None) -> torch.Tensor:
            parts = []
            if start < min(stop, stored):
                parts.append(file.read(key, start, min(stop, stored)).to(torch.float32))
            if stop > stored:
                extra = stop - max(start, stored)
                parts.append(mean_row().unsqueeze(0).expand(extra, *shape[1:]))
            return torch.cat(parts) if len(parts) > 1 else parts[0]

        origin = f"{key} ({file.label} {file.path.name})"
        self.provided[ours] = PlannedTensor(ours, want, self._out_dtype(ours), read, file, origin=origin)
        if stored < rows:
            return (
                f"`{ours}`: the checkpoint does not hold the output embedding; it comes from the language model, "
                f"whose {stored} rows lack the {rows - stored} tokens added for Flamingo (ids {stored}-{rows - 1}). "
                f"Those rows are set to the mean of the {stored} pretrained rows (the original code leaves them "
                "random at every load)."
            )
        return f"`{ours}`: the language model's {stored} rows were cut to the {rows} tokens of the tokenizer."

    def check_complete(self) -> None:
        missing = [k for k in self.expected if k not in self.provided]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            where = next((w for prefix, w in _EXPECTED_IN if missing[0].startswith(prefix)), "the inputs")
            raise ConversionError(f"missing key {missing[0]}{more}: not in {where}")


def _reader(file: WeightFile, key: str, offset: int = 0) -> Callable[[int | None, int | None], torch.Tensor]:
    def read(start: int | None, stop: int | None) -> torch.Tensor:
        if start is None:
            return file.read(key)
        return file.read(key, offset + start, offset + stop)

    return read


def _add_open_clip(planner: _Planner, file: WeightFile, rest: str, stored: str, shape, where: str) -> None:
    try:
        targets = open_clip_vision_targets(rest)
    except KeyError:
        if planner.ignorable("vision_encoder." + rest, rest):
            return
        raise ConversionError(f"unexpected key {stored} in the {where}: not a CLIP vision tower weight") from None
    for name, chunk in targets:
        planner.add(f"vision_encoder.{name}", file, stored, shape, what=f"{stored} ({where})", chunk=chunk)


def _flamingo_config(vision_config, text_config, every_n, media_id, eoc_id, ckpt_shapes, dtype):
    from modeling_flamingo.configuration.configuration_flamingo import FlamingoConfig

    frames = ckpt_shapes.get("perceiver.frame_embs")
    times = ckpt_shapes.get("perceiver.media_time_embs")
    try:
        config = FlamingoConfig(
            vision_config=vision_config.to_dict(),
            text_config=text_config.to_dict(),
            cross_attn_every_n_layers=every_n,
            media_token_id=media_id,
            eoc_token_id=eoc_id,
            max_num_frames=frames[0] if frames else None,
            max_num_media=times[0] if times else None,
        )
    except Exception as exc:
        raise ConversionError(f"cannot build the model config: {first_line(exc)}") from exc
    config.architectures = ["FlamingoForConditionalGeneration"]
    config.dtype = dtype
    config.vision_config.dtype = dtype
    config.text_config.dtype = dtype
    return config


def _meta_model(config):
    from modeling_flamingo.modeling_flamingo import FlamingoForConditionalGeneration

    with torch.device("meta"):
        return FlamingoForConditionalGeneration(config)
