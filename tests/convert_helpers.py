"""Release-shaped inputs for the conversion tests, written from the ORIGINAL OpenFlamingo model (tests/reference.py).

- `checkpoint.pt`: the original's trainable state dict as its training code saves it (`filter_state_dict_to_trainable`
  of open_flamingo 2.0.1), in the v2 layout, the v1 legacy LLaMA layout (duplicated cross-attention keys), or wrapped
  (`model_state_dict` + `module.` names, as a DDP training checkpoint).
- the language model as a hub repo folder: config.json (remote-code style for MPT and MosaicGPT), weights without
  the Flamingo blocks and with the hub's embedding rows (the checkpoint carries the trained ones), safetensors or
  `.bin`, single or sharded; GPT-NeoX with the hub's `embed_out` naming; the tokenizer files beside them.
- the vision tower as an HF CLIP folder (a `CLIPModel` with a text tower too) or an open_clip state-dict file.
"""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel

from modeling_flamingo.convert.mapping import open_clip_vision_state_dict
from modeling_flamingo.testing import TINY_LM_VOCAB, make_tiny_tokenizer, tiny_text_config, tiny_vision_config

from reference import build_original, random_pixels

PROMPTS = ["<image>Two cats.<|endofchunk|><image>A sink.<|endofchunk|><image>An image of", "<image>A dog runs"]


def filter_state_dict_to_trainable(model, state_dict):
    """open_flamingo 2.0.1's own `train_utils.filter_state_dict_to_trainable` (imported, not copied).

    Its module imports wandb at the top; a stand-in module is present only during that import.
    """
    stub = "wandb" not in sys.modules
    if stub:
        sys.modules["wandb"] = types.ModuleType("wandb")
    try:
        from open_flamingo.train.train_utils import filter_state_dict_to_trainable as original_filter
    finally:
        if stub:
            del sys.modules["wandb"]
    return original_filter(model, state_dict)


def base_tokenizer(family: str):
    """The language model's own tokenizer (no Flamingo tokens), identical to the one `build_original` starts from."""
    return make_tiny_tokenizer(bos_token="<s>" if family == "llama" else None)


def checkpoint_state_dict(original, family: str, layout: str = "v2") -> dict[str, torch.Tensor]:
    """The state dict a release `checkpoint.pt` holds."""
    state = {k: v.clone() for k, v in filter_state_dict_to_trainable(original, original.state_dict()).items()}
    if family == "gpt_neox":
        # The 2023 checkpoints name GPT-NeoX's head `embed_out` (kept by the "embed" rule of the filter);
        # transformers 5 calls it `lm_head`, which the filter drops as frozen.
        state["lang_encoder.embed_out.weight"] = original.lang_encoder.get_output_embeddings().weight.detach().clone()
    if layout == "v1":
        # open_flamingo 0.1 saved each cross-attention block under both of its module paths.
        layers = original.lang_encoder.decoder_layers_attr_name
        for key in list(state):
            prefix = f"lang_encoder.{layers}."
            if key.startswith(prefix) and ".gated_cross_attn_layer." in key:
                index, rest = key[len(prefix) :].split(".gated_cross_attn_layer.")
                state[f"lang_encoder.gated_cross_attn_layers.{index}.{rest}"] = state[key].clone()
    elif layout == "wrapped":
        state = {
            "epoch": 3,
            "model_state_dict": {"module." + k: v for k, v in state.items()},
            "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
        }
    return state


def lm_state_dict(original, family: str, head_rows: int | None = None, seed: int = 7) -> dict[str, torch.Tensor]:
    """The language model as its hub files hold it: no Flamingo blocks, unwrapped decoder layers, the hub's embedding
    rows (random: the checkpoint's trained rows must win). LLaMA's head keeps the original's first `head_rows` rows
    (default: the hub vocabulary, its first rows being the original's, so the conversion must cut it)."""
    lm = original.lang_encoder
    layers = lm.decoder_layers_attr_name
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, value in lm.state_dict().items():
        if key.startswith(("old_decoder_blocks.", "gated_cross_attn_layers.")) or ".gated_cross_attn_layer." in key:
            continue
        if key.startswith(layers + "."):
            key = key.replace(".decoder_layer.", ".", 1)
        out[key] = value.detach().clone()
    emb_name = next(k for k, v in lm.named_parameters() if v is lm.get_input_embeddings().weight)
    rows = TINY_LM_VOCAB
    out[emb_name] = torch.randn(rows, out[emb_name].shape[1], generator=gen)
    if family in ("mpt", "mosaic_gpt"):
        out.pop("lm_head.weight", None)  # tied: the remote code has no head
    elif family == "gpt_neox":
        out["embed_out.weight"] = torch.randn(rows, out.pop("lm_head.weight").shape[1], generator=gen)
        # Buffers that GPT-NeoX files saved by transformers 4.2x hold (the RedPajama hub files do).
        out["gpt_neox.layers.0.attention.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()
        out["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
        out["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(4)
    elif family == "llama":
        head = out.pop("lm_head.weight")
        n = head_rows or rows
        extra = torch.randn(max(0, n - head.shape[0]), head.shape[1], generator=gen)
        out["lm_head.weight"] = torch.cat([head, extra])[:n].contiguous()
        out["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # as in LLaMA files of transformers 4.28
    return out


def lm_config_dict(family: str) -> dict:
    """config.json of the tiny language model as its hub repo would spell it."""
    config = tiny_text_config(family)
    if family == "mpt":
        # The remote-code MPT config (anas-awadalla/mpt-7b), keys as the hub file has them.
        return {
            "architectures": ["MPTForCausalLM"],
            "attn_config": {
                "alibi": True,
                "alibi_bias_max": 8,
                "attn_impl": "torch",
                "attn_pdrop": 0,
                "attn_type": "multihead_attention",
                "attn_uses_sequence_id": False,
                "clip_qkv": None,
                "prefix_lm": False,
                "qk_ln": False,
                "softmax_scale": None,
            },
            "auto_map": {
                "AutoConfig": "configuration_mpt.MPTConfig",
                "AutoModelForCausalLM": "modeling_mpt.MPTForCausalLM",
            },
            "d_model": config.d_model,
            "emb_pdrop": 0,
            "embedding_fraction": 1.0,
            "expansion_ratio": 4,
            "init_config": {"init_std": 0.02, "name": "kaiming_normal_"},
            "init_device": "cpu",
            "learned_pos_emb": True,
            "logit_scale": None,
            "max_seq_len": config.max_seq_len,
            "model_type": "mpt",
            "n_heads": config.n_heads,
            "n_layers": config.n_layers,
            "no_bias": True,
            "norm_type": "low_precision_layernorm",
            "resid_pdrop": 0,
            "tokenizer_name": "EleutherAI/gpt-neox-20b",
            "torch_dtype": "bfloat16",
            "transformers_version": "4.28.1",
            "use_cache": False,
            "verbose": 0,
            "vocab_size": TINY_LM_VOCAB,
        }
    data = config.to_dict()
    if family == "mosaic_gpt":
        data["architectures"] = ["MosaicGPT"]
        data["auto_map"] = {
            "AutoConfig": "configuration_mosaic_gpt.MosaicGPTConfig",
            "AutoModelForCausalLM": "mosaic_gpt.MosaicGPT",
        }
    return data


def save_weights(state: dict[str, torch.Tensor], folder: Path, fmt: str = "safetensors", shards: int = 1) -> None:
    """Write `state` as a hub model's weight files: `model.safetensors` / `pytorch_model.bin`, or N shards + index."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(state)
    base, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")

    def write(part: dict, name: str) -> None:
        if fmt == "safetensors":
            save_file({k: v.contiguous() for k, v in part.items()}, str(folder / name), metadata={"format": "pt"})
        else:
            torch.save(part, folder / name)

    if shards == 1:
        write(state, f"{base}.{ext}")
        return
    size = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"{base}-{i + 1:05d}-of-{shards:05d}.{ext}"
        part = {k: state[k] for k in keys[i * size : (i + 1) * size]}
        write(part, name)
        weight_map.update(dict.fromkeys(part, name))
    index = {
        "metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
        "weight_map": weight_map,
    }
    (folder / f"{base}.{ext}.index.json").write_text(json.dumps(index, indent=2))


def save_lm_folder(original, family: str, folder: Path, fmt: str = "safetensors", shards: int = 1, **kwargs) -> Path:
    """A hub-like language model folder: config.json, weights, tokenizer files."""
    save_weights(lm_state_dict(original, family, **kwargs), folder, fmt, shards)
    (folder / "config.json").write_text(json.dumps(lm_config_dict(family), indent=2))
    base_tokenizer(family).save_pretrained(folder)
    return folder


def save_hf_clip(original, folder: Path, fmt: str = "safetensors") -> Path:
    """The original's vision tower inside an HF `CLIPModel` folder (random text tower)."""
    config = CLIPConfig(
        vision_config=tiny_vision_config().to_dict(),
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "vocab_size": 64,
            "max_position_embeddings": 16,
            "bos_token_id": 0,
            "eos_token_id": 1,
        },
        projection_dim=32,
    )
    torch.manual_seed(3)
    clip = CLIPModel(config)
    vision = open_clip_vision_state_dict(original.vision_encoder.state_dict(), prefix="vision_model.")
    missing, unexpected = clip.load_state_dict(vision, strict=False)
    assert not unexpected and not [k for k in missing if k.startswith("vision_model.")], (missing, unexpected)
    clip.save_pretrained(folder, safe_serialization=fmt == "safetensors")
    return folder


def save_open_clip(original, path: Path, with_visual_prefix: bool = False) -> Path:
    """The original's open_clip vision tower state dict (`conv1.weight`...), or a whole open_clip CLIP state dict
    (`visual.conv1.weight`... plus its text tower, whose names look like the vision tower's)."""
    vision = {k: v.clone() for k, v in original.vision_encoder.state_dict().items()}
    if with_visual_prefix:
        from reference import tiny_open_clip

        full = {k: v for k, v in tiny_open_clip(5).state_dict().items() if not k.startswith("visual.")}
        full.update({"visual." + k: v for k, v in vision.items()})
        vision = full
    torch.save(vision, path)
    return path


@dataclass
class Release:
    """One release-shaped set of inputs, and the original model they came from."""

    family: str
    original: object
    tokenizer: object
    checkpoint: Path
    language_model: Path
    vision_model: Path
    cross_attn_every_n_layers: int

    def args(self, output: Path, *extra: str) -> list[str]:
        return [
            "--checkpoint",
            str(self.checkpoint),
            "--vision-model",
            str(self.vision_model),
            "--language-model",
            str(self.language_model),
            "--cross-attn-every-n-layers",
            str(self.cross_attn_every_n_layers),
            "--output-dir",
            str(output),
            *extra,
        ]


def open_clip_vision_config():
    """The tiny CLIP tower with open_clip's head width of 64 (one head), as the converter reads open_clip files."""
    config = tiny_vision_config()
    config.num_attention_heads = config.hidden_size // 64
    return config


def make_release(
    family: str,
    root: Path,
    layout: str = "v2",
    lm_format: str = "safetensors",
    lm_shards: int = 1,
    vision: str = "hf",
    head_rows: int | None = None,
) -> Release:
    """Write every input of one conversion under `root`."""
    from modeling_flamingo.testing import CROSS_ATTN_EVERY

    root.mkdir(parents=True, exist_ok=True)
    original, tokenizer = build_original(family, vision_config=None if vision == "hf" else open_clip_vision_config())
    torch.save(checkpoint_state_dict(original, family, layout), root / "checkpoint.pt")
    lm = save_lm_folder(original, family, root / "lm", lm_format, lm_shards, head_rows=head_rows)
    if head_rows is not None and head_rows < len(tokenizer):
        # The LM's head lacks the added tokens' rows (v1 LLaMA): the original leaves them random, the conversion uses
        # the mean of the pretrained rows; give the reference the same rows so that logits can be compared.
        with torch.no_grad():
            head = original.lang_encoder.get_output_embeddings().weight
            head[head_rows:] = head[:head_rows].double().mean(0).float()
    if vision == "hf":
        vision_path = save_hf_clip(original, root / "clip")
    else:
        vision_path = save_open_clip(
            original, root / "open_clip_vision.pt", with_visual_prefix=vision == "open_clip_visual"
        )
    return Release(family, original, tokenizer, root / "checkpoint.pt", lm, vision_path, CROSS_ATTN_EVERY[family])


def compare_with_original(release: Release, folder: Path, atol: float = 1e-4, generate: bool = True) -> None:
    """Logits of the converted model equal the original's on a left-padded batch of two prompts with different image
    counts, and greedy generations are identical."""
    from modeling_flamingo import FlamingoForConditionalGeneration

    model = FlamingoForConditionalGeneration.from_pretrained(folder).eval()
    tok = release.tokenizer
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    px = random_pixels(2, 3)
    with torch.no_grad():
        ref = release.original(px, enc.input_ids, attention_mask=enc.attention_mask).logits
        got = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=px).logits
    mask = enc.attention_mask.bool()
    diff = (ref - got)[mask].abs().max().item()
    assert diff < atol, f"{release.family}: max logit difference {diff}"
    if generate:
        kw = {"max_new_tokens": 6, "num_beams": 1, "do_sample": False, "pad_token_id": tok.pad_token_id}
        with torch.no_grad():
            want = release.original.generate(px, enc.input_ids, attention_mask=enc.attention_mask, **kw)
            out = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=px, **kw)
        assert torch.equal(want, out), (want[:, -6:], out[:, -6:])
