"""LoRA adapters (PEFT) on the language model's decoder layers, trained beside the original's trainable set.

The original recipe has no LoRA: this trains low-rank adapters on the frozen language model in addition to the
resampler, the gated cross-attention blocks and the two new embedding rows. The adapters live inside the model's
own modules (`peft.inject_adapter_in_model` on `model.language_model`), so the Flamingo forward, the parameter groups
(adapters go to the group without weight decay) and every Accelerate backend see an ordinary module tree.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from modeling_flamingo.modeling_flamingo import FlamingoForConditionalGeneration

ADAPTER_NAME = "default"
# Per language model: the attention projections PEFT targets by default (MosaicGPT is not in PEFT's table).
DEFAULT_TARGET_MODULES = {
    "llama": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "mpt": ["Wqkv"],
    "mosaic_gpt": ["Wqkv"],
}
_LORA_A = f".lora_A.{ADAPTER_NAME}.weight"
_LORA_B = f".lora_B.{ADAPTER_NAME}.weight"


def _require_peft():
    try:
        import peft
    except ImportError:
        raise ValueError(
            "LoRA needs PEFT: pip install 'openflamingo-transformers[train]' (or pip install peft)"
        ) from None
    return peft


def add_lora_adapters(
    model: FlamingoForConditionalGeneration,
    r: int,
    alpha: float = 16,
    dropout: float = 0.0,
    target_modules: list[str] | None = None,
) -> dict:
    """Inject LoRA adapters into the language model's decoder layers (never into the cross-attention blocks) and make
    them trainable. Call after `freeze_for_flamingo_training`: the original's trainable set stays trainable.

    Returns:
        the adapter config as a dict (what `save_lora_adapter` writes).
    """
    peft = _require_peft()
    if r < 1:
        raise ValueError(f"lora_r must be >= 1; got {r}.")
    model_type = model.config.text_config.model_type
    targets = list(target_modules or DEFAULT_TARGET_MODULES.get(model_type, []))
    if not targets:
        raise ValueError(f"No default LoRA target modules for {model_type!r}: give --lora_target_modules.")
    # Only the decoder layers' own modules: `<layers>.<i>.decoder_layer.<...>.<target>`.
    layers = model.config.decoder_layers_attr_name.replace(".", r"\.")
    pattern = rf"^{layers}\.\d+\.decoder_layer\..*\b({'|'.join(targets)})$"
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern, bias="none")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    try:
        peft.inject_adapter_in_model(config, model.language_model, adapter_name=ADAPTER_NAME)
    except ValueError as exc:
        raise ValueError(f"LoRA: {str(exc).splitlines()[0]}") from None
    # PEFT freezes everything but the adapters inside the module it was given: restore the Flamingo trainable set.
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable or "lora_" in name)
    if not any("lora_" in n for n, _ in model.named_parameters()):
        raise ValueError(f"LoRA: no module of the language model matches {targets}.")
    data = config.to_dict()
    data["target_modules"] = pattern
    data["peft_type"] = "LORA"
    model._flamingo_lora = {"r": r, "alpha": alpha, "config": data}
    return data


def has_lora(model) -> bool:
    return getattr(model, "_flamingo_lora", None) is not None


def merged_state_dict(model, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's state dict with every LoRA delta (B @ A * alpha / r) added to its base weight, under the names of
    the model without adapters (`...Wqkv.base_layer.weight` -> `...Wqkv.weight`); adapter tensors dropped."""
    info = model._flamingo_lora
    scaling = info["alpha"] / info["r"]
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if ".lora_" in key:
            continue
        if ".base_layer." in key:
            prefix = key[: key.index(".base_layer.")]
            clean = key.replace(".base_layer.", ".")
            if key.endswith(".base_layer.weight") and prefix + _LORA_A in state_dict:
                a, b = state_dict[prefix + _LORA_A], state_dict[prefix + _LORA_B]
                tensor = tensor + (b.float() @ a.float() * scaling).to(tensor.dtype)
            out[clean] = tensor
        else:
            out[key] = tensor
    return out


def save_lora_adapter(model, folder: str | os.PathLike, state_dict: dict[str, torch.Tensor]) -> Path:
    """`adapter_model.safetensors` (the adapter weights, names relative to the language model, as PEFT writes them)
    and `adapter_config.json`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    prefix = "language_model."
    adapter = {
        k[len(prefix) :].replace(f".{ADAPTER_NAME}.", "."): v.detach().cpu().contiguous()
        for k, v in state_dict.items()
        if ".lora_" in k and k.startswith(prefix)
    }
    save_file(adapter, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(model._flamingo_lora["config"], indent=2, default=str))
    return folder


def load_lora_adapter(model: FlamingoForConditionalGeneration, folder: str | os.PathLike) -> None:
    """Inject the adapter `save_lora_adapter` wrote into `model` (the same base model) and load its weights."""
    peft = _require_peft()
    from safetensors.torch import load_file

    folder = Path(folder)
    data = json.loads((folder / "adapter_config.json").read_text())
    config = peft.LoraConfig(
        r=data["r"],
        lora_alpha=data["lora_alpha"],
        lora_dropout=data.get("lora_dropout", 0.0),
        target_modules=data["target_modules"],
        bias="none",
    )
    peft.inject_adapter_in_model(config, model.language_model, adapter_name=ADAPTER_NAME)
    result = peft.set_peft_model_state_dict(model.language_model, load_file(str(folder / "adapter_model.safetensors")))
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{folder}: adapter weights that fit no module: {result.unexpected_keys[:3]}")
    model._flamingo_lora = {"r": data["r"], "alpha": data["lora_alpha"], "config": data}


__all__ = [
    "DEFAULT_TARGET_MODULES",
    "add_lora_adapters",
    "has_lora",
    "load_lora_adapter",
    "merged_state_dict",
    "save_lora_adapter",
]
