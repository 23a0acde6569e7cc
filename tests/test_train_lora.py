"""LoRA adapters on the language model (PEFT), trained beside the original's trainable set: only adapters and that
set move, and the exports (adapter folder, merged `model/`) give the trained model's logits."""

from __future__ import annotations

import torch

from modeling_flamingo import FlamingoForConditionalGeneration
from modeling_flamingo.training import FlamingoTrainer
from modeling_flamingo.training.lora import load_lora_adapter

from train_helpers import (
    MMC4_TEXTS,
    batches,
    fresh_accelerate_state,
    loader_factory,
    make_batch,
    tiny_model,
    train_args,
)


def test_lora_trains_adapters_and_exports_them(tmp_path):
    model, tokenizer = tiny_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    data = batches(tokenizer, 2)
    args = train_args(learning_rate=1e-2, warmup_steps=0, run_name=str(tmp_path / "run"), lora_r=4, logging_steps=0)
    with fresh_accelerate_state():
        FlamingoTrainer(args, model, None, loader_factory(*data)).train()
    model.eval()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n in names if "lora_" in n}
    assert lora and all(".decoder_layer.attn.Wqkv." in n for n in lora)  # never inside the cross-attention
    assert {n for n in names - lora if "perceiver" in n} and {n for n in names - lora if "gated_cross_attn" in n}
    state = model.state_dict()
    for key, value in base.items():  # frozen LM weights (now under base_layer) did not move
        if ".decoder_layer." in key and "gated_cross_attn" not in key:
            now = state.get(key, state.get(key.replace("Wqkv.", "Wqkv.base_layer.")))
            assert torch.equal(now, value), key
    assert any(not torch.equal(state[n], torch.zeros_like(state[n])) for n in lora if "lora_B" in n)

    batch = make_batch(tokenizer, MMC4_TEXTS[:2], 2, True, 7)
    batch.pop("labels")
    with torch.no_grad():
        expected = model(**batch).logits
        merged = FlamingoForConditionalGeneration.from_pretrained(tmp_path / "run" / "model").eval()
        torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-5, rtol=0)
        # The adapter folder: the base model with the trained connecting weights, plus the adapter, is the model.
        rebuilt, _ = tiny_model()
        trained = {k: v for k, v in model.state_dict().items() if "lora_" not in k and ".base_layer." not in k}
        rebuilt.load_state_dict(trained, strict=False)
        load_lora_adapter(rebuilt, tmp_path / "run" / "adapter")
        torch.testing.assert_close(rebuilt.eval()(**batch).logits, expected, atol=1e-5, rtol=0)
