"""What the conversion reads from its inputs before planning: the language model's config (as JSON, no remote code),
its decoder layers and embedding names (on a meta-device instance), the tokenizer, the vision tower's config (from an
HF CLIP folder or an open_clip state dict), and the checkpoint's keys and cross-attention interval."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
from pathlib import Path

import torch

from .mapping import canonical_original_key, strip_wrapper_prefixes
from .sources import ConversionError, Resolved, WeightFile, WeightFolder, first_line, read_json

# Keys of a language model's hub config.json that describe the remote code or the saving run, not the model.
_DROPPED_LM_CONFIG_KEYS = (
    "auto_map",
    "architectures",
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
)
# open_clip's ViTs (every OpenFlamingo release) use heads of 64.
OPEN_CLIP_HEAD_WIDTH = 64


def check_tied_copy(checkpoint: WeightFile, stored: str, emb_stored: str | None, ours: str) -> None:
    """A tied head saved next to the embeddings (transformers' MPT keeps both names) must equal them."""
    if emb_stored is None or not _same_tensor(checkpoint, stored, emb_stored):
        raise ConversionError(
            f"the checkpoint's {stored} differs from its input embeddings, but this language model ties them ({ours})"
        )


def checkpoint_keys(checkpoint: WeightFile, layers_attr: str) -> dict[str, str]:
    """Canonical original key -> the key stored in the checkpoint (wrappers stripped, aliases checked equal)."""
    canonical: dict[str, str] = {}
    aliases: list[tuple[str, str]] = []
    for stored in checkpoint.keys():
        name, is_alias = canonical_original_key(strip_wrapper_prefixes(stored), layers_attr)
        if is_alias:
            aliases.append((name, stored))
        elif name in canonical:
            _check_same(checkpoint, canonical[name], stored)
        else:
            canonical[name] = stored
    for name, stored in aliases:
        if name in canonical:
            _check_same(checkpoint, canonical[name], stored)
        else:
            canonical[name] = stored
    return canonical


def _same_tensor(file: WeightFile, a: str, b: str) -> bool:
    """Whether two tensors of one file (pickle or safetensors) have the same shape and values."""
    first, second = file.read(a), file.read(b)
    return first.shape == second.shape and torch.equal(first, second)


def _check_same(checkpoint: WeightFile, a: str, b: str) -> None:
    if not _same_tensor(checkpoint, a, b):
        raise ConversionError(f"the checkpoint holds two different values for one weight: {b} differs from {a}")


_XATTN_LAYER = re.compile(r"^lang_encoder\.(.+)\.(\d+)\.gated_cross_attn_layer\.")


def cross_attn_interval(shapes: dict, layers_attr: str, num_layers: int, requested: int | None) -> int:
    """Check (or infer) the cross-attention interval from the layers that carry a block in the checkpoint."""
    layers: set[int] = set()
    for key in shapes:
        m = _XATTN_LAYER.match(key)
        if m is None:
            continue
        if m[1] != layers_attr:
            raise ConversionError(
                f"the checkpoint's cross-attention key {key} is not under lang_encoder.{layers_attr}: the checkpoint "
                "belongs to another language model family"
            )
        layers.add(int(m[2]))
    if not layers:
        raise ConversionError("the checkpoint holds no gated cross-attention layers: not an OpenFlamingo checkpoint?")
    if max(layers) >= num_layers:
        raise ConversionError(
            f"the checkpoint has a cross-attention block before decoder layer {max(layers)} but the language model "
            f"has {num_layers} layers: wrong --language-model?"
        )
    found = min(layers) + 1
    consistent = layers == {i for i in range(num_layers) if (i + 1) % found == 0}
    if requested is not None and (not consistent or found != requested):
        seen = f"every {found} layers" if consistent else f"before decoder layers {sorted(layers)}"
        raise ConversionError(
            f"wrong cross-attention interval: --cross-attn-every-n-layers is {requested} but the checkpoint has "
            f"cross-attention {seen}"
        )
    if not consistent:
        raise ConversionError(
            f"the checkpoint's cross-attention layers {sorted(layers)} do not follow a fixed interval"
        )
    return found


def embedding_names(text_config) -> tuple[str, str | None]:
    """Names (relative to the causal LM) of its input embedding weight and of its separate output head's weight
    (None when the logits reuse the input embeddings: no head module, or a head tied to them)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(text_config)
    emb_weight = lm.get_input_embeddings().weight
    emb = next(n for n, p in lm.named_parameters(remove_duplicate=False) if p is emb_weight)
    head = lm.get_output_embeddings()
    if head is None or head.weight is emb_weight or getattr(text_config, "tie_word_embeddings", False):
        return emb, None
    out = next(n for n, m in lm.named_modules() if m is head)
    return emb, f"{out}.weight"


def language_model_config(path: Path):
    """A transformers config from a (possibly remote-code) config.json, without running any code from it."""
    from transformers import CONFIG_MAPPING

    import modeling_flamingo  # noqa: F401  (registers `mosaic_gpt` with AutoConfig)

    data = read_json(path, "language model config")
    model_type = data.get("model_type")
    if not model_type:
        raise ConversionError(f"language model config {path} has no model_type")
    if model_type not in CONFIG_MAPPING:
        raise ConversionError(f"unsupported language model type {model_type!r} in {path}")
    for key in _DROPPED_LM_CONFIG_KEYS:
        data.pop(key, None)
    try:
        return CONFIG_MAPPING[model_type].from_dict(data)
    except Exception as exc:
        raise ConversionError(f"cannot read language model config {path}: {first_line(exc)}") from exc


def decoder_layers_attr_name(text_config, path: Path) -> str:
    """Where the language model keeps its decoder layers, found on a weightless (meta-device) instance of it."""
    from modeling_flamingo.modeling_flamingo import _language_model_from_config, find_decoder_layers_attr_name

    try:
        with torch.device("meta"):
            return find_decoder_layers_attr_name(_language_model_from_config(text_config))
    except ValueError as exc:
        raise ConversionError(f"unsupported language model {text_config.model_type!r} in {path}: {exc}") from exc


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:
        # LLaMA folders converted with transformers 4.28 name the class `LLaMATokenizer`.
        config = folder / "tokenizer_config.json"
        if config.is_file() and str(read_json(config, "tokenizer config").get("tokenizer_class", "")).lower() in (
            "llamatokenizer",
            "llamatokenizerfast",
        ):
            from transformers import LlamaTokenizer

            with contextlib.suppress(Exception):
                return LlamaTokenizer.from_pretrained(str(folder))
        raise ConversionError(f"cannot load the tokenizer from {folder}: {first_line(exc)}") from exc


def read_vision(src: Resolved, hidden_act: str):
    """(CLIPVisionConfig, weight source, kind) of an HF CLIP folder or an open_clip state-dict file."""
    from transformers import CLIPConfig, CLIPVisionConfig

    if src.path.is_dir():
        data = read_json(src.path / "config.json", "vision model config")
        model_type = data.get("model_type")
        try:
            if model_type == "clip":
                config = CLIPConfig.from_dict(data).vision_config
            elif model_type == "clip_vision_model":
                config = CLIPVisionConfig.from_dict(data)
            else:
                raise ConversionError(
                    f"vision model {src.path} is a {model_type!r} model; expected a CLIP model (model_type 'clip')"
                )
        except ConversionError:
            raise
        except Exception as exc:
            raise ConversionError(f"cannot read vision model config {src.path}: {first_line(exc)}") from exc
        return config, list(WeightFolder.find(src.path, "vision model file")), "hf"

    file = WeightFile(src.path, "vision file", nested=True)
    infos = file.infos()
    stripped = {strip_wrapper_prefixes(k): k for k in infos}
    if any(k.startswith("visual.") for k in stripped):
        keymap = {k[len("visual.") :]: s for k, s in stripped.items() if k.startswith("visual.")}
    else:
        keymap = stripped
    if "conv1.weight" not in keymap or "positional_embedding" not in keymap:
        raise ConversionError(
            f"vision file {src.path} is not an open_clip vision state dict (no conv1.weight / positional_embedding)"
        )
    conv = infos[keymap["conv1.weight"]].shape
    width, patch = conv[0], conv[-1]
    grid = math.isqrt(infos[keymap["positional_embedding"]].shape[0] - 1)
    blocks = {int(m[1]) for k in keymap if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))}
    fc = keymap.get("transformer.resblocks.0.mlp.c_fc.weight")
    if not blocks or fc is None or width % OPEN_CLIP_HEAD_WIDTH:
        raise ConversionError(f"vision file {src.path}: cannot read the architecture of the vision tower from it")
    proj = keymap.get("proj")
    config = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=infos[fc].shape[0],
        num_hidden_layers=max(blocks) + 1,
        num_attention_heads=width // OPEN_CLIP_HEAD_WIDTH,
        patch_size=patch,
        image_size=grid * patch,
        num_channels=conv[1],
        projection_dim=infos[proj].shape[1] if proj else 512,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
    )
    file.close()
    return config, (file, keymap), "open_clip"


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's content, read in 8 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()
