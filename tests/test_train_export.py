"""Exports of a trained model: `checkpoint.pt` in the original v2 layout loads into the original code and through our
converter, and `model/` loads with `from_pretrained`; all three give the trained model's logits."""

from __future__ import annotations

import pytest
import torch

from modeling_flamingo import FlamingoForConditionalGeneration, FlamingoProcessor
from modeling_flamingo.convert import ConversionSpec, convert
from modeling_flamingo.convert.mapping import canonical_original_key
from modeling_flamingo.demo import write_release_inputs
from modeling_flamingo.testing import make_tiny_tokenizer
from modeling_flamingo.training import FlamingoTrainer, original_checkpoint_state_dict

from reference import build_original, ours_from_original
from train_helpers import (
    LAION_TEXTS,
    MMC4_TEXTS,
    fresh_accelerate_state,
    loader_factory,
    make_batch,
    tiny_processor,
    train_args,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The original 3B layout (MosaicGPT, tied embeddings) trained for two steps by our loop."""
    root = tmp_path_factory.mktemp("export")
    original, tokenizer = build_original("mosaic_gpt")
    ours = ours_from_original(original, tokenizer, "mosaic_gpt")
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    laion = [make_batch(tokenizer, LAION_TEXTS[i : i + 2], 1, False, i) for i in range(2)]
    mmc4 = [make_batch(tokenizer, MMC4_TEXTS[i : i + 2], 2, True, 10 + i) for i in range(2)]
    processor = tiny_processor(tokenizer)
    args = train_args(learning_rate=1e-2, warmup_steps=0, run_name=str(root / "run"), logging_steps=0)
    with fresh_accelerate_state():
        FlamingoTrainer(args, ours, processor, loader_factory(laion, mmc4)).train()
    ours.eval()
    batch = make_batch(tokenizer, MMC4_TEXTS[2:4], 2, True, 99)
    batch.pop("labels")
    with torch.no_grad():
        expected = ours(**batch).logits
        untrained = original(batch["pixel_values"], batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert not torch.allclose(expected, untrained, atol=1e-3)  # training changed the model
    return {
        "root": root,
        "original": original,
        "ours": ours,
        "tokenizer": tokenizer,
        "batch": batch,
        "expected": expected,
        "before": before,
    }


def _close(actual, trained):
    mask = trained["batch"]["attention_mask"].bool()
    torch.testing.assert_close(actual[mask], trained["expected"][mask], atol=1e-4, rtol=0)


def test_checkpoint_has_the_release_layout(trained):
    state = torch.load(trained["root"] / "run" / "checkpoint.pt", weights_only=True)
    assert "lang_encoder.transformer.wte.weight" in state
    assert "perceiver.latents" in state and "perceiver.layers.0.0.to_q.weight" in state
    assert "perceiver.layers.0.1.1.weight" in state  # feed-forward Sequential indices, as the original names them
    assert "lang_encoder.transformer.blocks.0.gated_cross_attn_layer.ff.3.weight" in state
    assert not any(k.startswith("vision_encoder.") for k in state)
    assert not any(".decoder_layer." in k for k in state)  # no frozen decoder weights
    assert state.keys() == original_checkpoint_state_dict(trained["ours"]).keys()


@torch.no_grad()
def test_original_code_loads_the_checkpoint(trained):
    original, batch = trained["original"], trained["batch"]
    state = torch.load(trained["root"] / "run" / "checkpoint.pt", weights_only=True)
    # What the original's evaluation code does with a checkpoint.pt.
    missing, unexpected = original.load_state_dict(state, strict=False)
    assert not unexpected
    # Every trainable parameter of the original is in the file (under its own name or an alias's).
    layers = trained["ours"].config.decoder_layers_attr_name
    canonical = {canonical_original_key(k, layers)[0] for k in missing}
    trainable = {canonical_original_key(n, layers)[0] for n, p in original.named_parameters() if p.requires_grad}
    assert not (canonical - state.keys()) & trainable
    logits = original(batch["pixel_values"], batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    _close(logits, trained)


@torch.no_grad()
def test_converter_reads_the_checkpoint(trained):
    root, ours, tokenizer = trained["root"], trained["ours"], trained["tokenizer"]
    # The language model and CLIP folders as a release has them (frozen weights, original vocabulary size).
    (root / "parts").mkdir()
    inputs = write_release_inputs(ours, tokenizer, make_tiny_tokenizer(), root / "parts")
    spec = ConversionSpec(
        checkpoint=str(root / "run" / "checkpoint.pt"),
        vision_model=str(inputs["clip"]),
        language_model=str(inputs["language_model"]),
        cross_attn_every_n_layers=ours.config.cross_attn_every_n_layers,
    )
    folder = convert(spec, root / "converted")
    converted = FlamingoForConditionalGeneration.from_pretrained(folder).eval()
    _close(converted(**trained["batch"]).logits, trained)


@torch.no_grad()
def test_saved_model_folder_loads_with_its_processor(trained):
    folder = trained["root"] / "run" / "model"
    model = FlamingoForConditionalGeneration.from_pretrained(folder).eval()
    _close(model(**trained["batch"]).logits, trained)
    processor = FlamingoProcessor.from_pretrained(folder)
    assert processor.media_token_id == model.config.media_token_id
    assert processor.image_processor.crop_size["height"] == 42
