"""A Flamingo on every language-model family: today's four and newer ones that no code of ours names.

For each family of `ALL_FAMILIES` (tiny random configs from transformers' own config classes, see
`modeling_flamingo.testing.tiny_text_config`): the decoder layers are found through the LM's `get_decoder()`; a freshly
assembled Flamingo (closed gates) computes exactly the bare LM's logits, images or not; with open gates, greedy and beam
`generate` on the LM's own cache (dynamic, sliding-window, hybrid sliding/global, and static where the family has one)
give the tokens of recomputing the whole sequence at every step; a left-padded batch gives each sample's own result; a
training step moves only what `freeze_for_flamingo_training` and the token rows leave trainable; save/load and the
remote-code folder (in a process without the package) give the same logits.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, CLIPVisionModel

from modeling_flamingo import FlamingoConfig, FlamingoForConditionalGeneration
from modeling_flamingo.modeling_flamingo import find_decoder_layers_attr_name
from modeling_flamingo.modeling_mosaic_gpt import CACHE_NAME
from modeling_flamingo.testing import (
    ALL_FAMILIES,
    CROSS_ATTN_EVERY,
    EXTRA_FAMILIES,
    add_flamingo_tokens,
    make_tiny_tokenizer,
    tiny_flamingo_config,
    tiny_text_config,
    tiny_vision_config,
)
from modeling_flamingo.training import (
    EmbeddingGradientMask,
    TrainableTokenRows,
    build_optimizer,
    freeze_for_flamingo_training,
)
from modeling_flamingo.training.model_init import assemble_flamingo
from modeling_flamingo.training.trainer import fsdp_wrap_classes

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from train_helpers import MMC4_TEXTS, make_batch  # noqa: E402

# Where each family keeps its layers (docs/DESIGN: LLaMA-like `model.layers`, GPT-2 `transformer.h`, GPT-NeoX
# `gpt_neox.layers`, MPT `transformer.blocks`): today's four must keep the paths of converted folders and checkpoints.
LAYER_PATHS = {
    "gpt_neox": "gpt_neox.layers",
    "mpt": "transformer.blocks",
    "mosaic_gpt": "transformer.blocks",
    "gpt2": "transformer.h",
    **{family: "model.layers" for family in ("llama", *EXTRA_FAMILIES) if family != "gpt2"},
}
PROMPT = "<image>Two cats on a couch.<|endofchunk|><image>A dog runs after"
SHORT_PROMPT = "<image>A sink"
TEXT = "A dog runs after a red ball."
NEW_TOKENS = 6  # more than the sliding window (4) on top of prompts longer than it
SLIDING_FAMILIES = {"mistral", "gemma2", "gemma3_text"}  # gemma: hybrid, sliding and global layers


class Family:
    """A family's tokenizer, bare LM, the Flamingo assembled from it (closed gates) and a copy with open gates."""

    def __init__(self, family: str):
        self.name = family
        self.tokenizer = add_flamingo_tokens(make_tiny_tokenizer(bos_token="<s>" if family == "llama" else None))
        torch.manual_seed(0)
        text_config = tiny_text_config(family, vocab_size=len(self.tokenizer))
        self.lm = AutoModelForCausalLM.from_config(text_config).eval()
        vision = CLIPVisionModel(tiny_vision_config()).eval()
        self.model, _ = assemble_flamingo(vision, self.lm, self.tokenizer, CROSS_ATTN_EVERY[family])
        self.model.eval()
        self.opened = copy.deepcopy(self.model)
        with torch.no_grad():
            for block in self.opened.gated_cross_attn_layers:
                block.attn_gate.uniform_(0.5, 1.5)
                block.ff_gate.uniform_(0.5, 1.5)

    def encode(self, texts: list[str], padding_side: str = "left") -> dict[str, torch.Tensor]:
        """Padded ids and mask, and random (B, T_img, 1, 3, 42, 42) pixel values with one image per `<image>`
        (the slots of samples with fewer images hold zeros)."""
        self.tokenizer.padding_side = padding_side
        batch = dict(self.tokenizer(texts, return_tensors="pt", padding="longest"))
        counts = [text.count("<image>") for text in texts]
        pixel_values = torch.randn(len(texts), max(counts), 1, 3, 42, 42, generator=torch.Generator().manual_seed(3))
        for b, count in enumerate(counts):
            pixel_values[b, count:] = 0
        return {**batch, "pixel_values": pixel_values}


@pytest.fixture(scope="module", params=ALL_FAMILIES)
def family(request) -> Family:
    return Family(request.param)


def test_decoder_layers_are_found_through_the_language_model_s_own_accessors(family):
    config = family.model.config
    assert config.decoder_layers_attr_name == LAYER_PATHS[family.name]
    assert find_decoder_layers_attr_name(family.lm) == LAYER_PATHS[family.name]
    # Every layer is wrapped around the LM's own layer class, and that class is a device-map / FSDP unit.
    layer_class = type(family.lm.get_decoder().get_submodule(LAYER_PATHS[family.name].split(".")[-1])[0])
    assert [type(layer.decoder_layer) for layer in family.model.decoder_layers] == [layer_class] * len(
        family.model.decoder_layers
    )
    assert layer_class.__name__ in family.model._no_split_modules


def test_fsdp_units_are_found_in_the_built_model(family):
    classes = fsdp_wrap_classes(family.model)
    decoder_layer = type(family.model.decoder_layers[0].decoder_layer).__name__
    expected = {"CLIPEncoderLayer", "FlamingoPerceiverResampler", "FlamingoGatedCrossAttentionBlock", decoder_layer}
    assert expected <= set(classes)
    assert set(classes) <= {type(module).__name__ for module in family.model.modules()}


def test_fsdp_units_do_not_depend_on_the_parts_declaring_them(monkeypatch):
    # As a language model or vision tower from remote code may: no `_no_split_modules` of their own.
    from transformers.models.clip.modeling_clip import CLIPPreTrainedModel
    from transformers.models.qwen2.modeling_qwen2 import Qwen2PreTrainedModel

    monkeypatch.setattr(Qwen2PreTrainedModel, "_no_split_modules", None)
    monkeypatch.setattr(CLIPPreTrainedModel, "_no_split_modules", None)
    with torch.device("meta"):
        model = FlamingoForConditionalGeneration(tiny_flamingo_config("qwen2"))
    expected = [
        "CLIPEncoderLayer",
        "FlamingoGatedCrossAttentionBlock",
        "FlamingoPerceiverResampler",
        "Qwen2DecoderLayer",
    ]
    assert fsdp_wrap_classes(model) == expected


def test_closed_gates_give_exactly_the_language_model_s_logits(family):
    batch, text = family.encode([PROMPT]), family.encode([TEXT])
    with torch.no_grad():
        expected = family.lm(input_ids=batch["input_ids"]).logits
        with_images = family.model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
        text_only = family.model(input_ids=text["input_ids"]).logits
    assert torch.equal(with_images, expected)
    with torch.no_grad():
        assert torch.equal(text_only, family.lm(input_ids=text["input_ids"]).logits)
    # The open gates do change them (the comparison above is not between models that ignore the images).
    with torch.no_grad():
        opened = family.opened(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
    assert not torch.allclose(opened, expected, atol=1e-3)


def _generate_kwargs(model) -> dict:
    """Exactly `NEW_TOKENS` tokens, none of them `<|endofchunk|>` (the end) or `<image>`, as `_logprobs` masks them."""
    config = model.config
    return {
        "max_new_tokens": NEW_TOKENS,
        "min_new_tokens": NEW_TOKENS,
        "suppress_tokens": [config.media_token_id],
        "do_sample": False,
    }


def _logprobs(model, ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, T) ids -> (B, vocab) log-probabilities of the next token, recomputed over the whole sequence without any
    cache; `<|endofchunk|>` and `<image>` masked as `_generate_kwargs` masks them."""
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixel_values, use_cache=False).logits[:, -1]
    logprobs = logits.float().log_softmax(-1)
    logprobs[:, [model.config.eoc_token_id, model.config.media_token_id]] = -float("inf")
    return logprobs


def _greedy_reference(model, ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    for _ in range(NEW_TOKENS):
        ids = torch.cat([ids, _logprobs(model, ids, pixel_values).argmax(-1, keepdim=True)], dim=1)
    return ids


def _beam_reference(model, ids: torch.Tensor, pixel_values: torch.Tensor, beams: int) -> torch.Tensor:
    """Beam search over one prompt, no end token: keep the `beams` best sums of log-probabilities, return the best."""
    sequences, scores = ids, torch.zeros(1)
    for _ in range(NEW_TOKENS):
        expanded = pixel_values.expand(len(sequences), *pixel_values.shape[1:])
        candidates = scores[:, None] + _logprobs(model, sequences, expanded)
        top = candidates.flatten().topk(beams)
        vocab = candidates.shape[1]
        sequences = torch.cat([sequences[top.indices // vocab], (top.indices % vocab)[:, None]], dim=1)
        scores = top.values
    return sequences[:1]


@pytest.mark.parametrize("mode", ["greedy", "beam", "static"])
def test_generate_with_the_cache_gives_the_tokens_of_recomputing_every_step(family, mode):
    model = family.opened
    batch = family.encode([PROMPT])
    ids, pixels = batch["input_ids"], batch["pixel_values"]
    kwargs = _generate_kwargs(model)
    if mode == "static":
        kwargs["cache_implementation"] = "static"
    if mode == "beam":
        kwargs["num_beams"] = 2
        expected = _beam_reference(model, ids, pixels, beams=2)
    else:
        expected = _greedy_reference(model, ids, pixels)
    out = model.generate(
        input_ids=ids,
        attention_mask=batch["attention_mask"],
        pixel_values=pixels,
        return_dict_in_generate=True,
        **kwargs,
    )
    assert out.sequences.tolist() == expected.tolist()
    if family.name == "mosaic_gpt":
        return  # our port of the original's remote code keeps legacy tuples, which generate does not return
    # The LM's own cache did the work: static where asked, with sliding-window layers in the sliding families.
    cache = getattr(out, CACHE_NAME)
    assert type(cache).__name__ == ("StaticCache" if mode == "static" else "DynamicCache")
    sliding = {type(layer).__name__ for layer in cache.layers if "SlidingWindow" in type(layer).__name__}
    assert bool(sliding) == (family.name in SLIDING_FAMILIES)


def test_left_padding_gives_each_sample_s_unpadded_result(family):
    model = family.opened
    texts = [PROMPT, SHORT_PROMPT]
    batch = family.encode(texts)
    mask = batch["attention_mask"]
    assert (mask[1] == 0).any()  # the short prompt is padded
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    kwargs = _generate_kwargs(model)
    with torch.no_grad():
        logits = model(**batch, position_ids=position_ids).logits
    generated = model.generate(**batch, **kwargs)
    for b, text in enumerate(texts):
        alone = family.encode([text])
        alone["pixel_values"] = batch["pixel_values"][b : b + 1, : text.count("<image>")]
        length = alone["input_ids"].shape[1]
        with torch.no_grad():
            expected = model(**alone).logits
        torch.testing.assert_close(logits[b, -length:], expected[0], atol=1e-5, rtol=1e-5)
        assert generated[b, -(length + NEW_TOKENS) :].tolist() == model.generate(**alone, **kwargs)[0].tolist()


def test_a_training_step_moves_only_the_trainable_set(family):
    model = copy.deepcopy(family.opened).train()
    freeze_for_flamingo_training(model)
    plain = copy.deepcopy(model)
    new_rows = sorted({model.config.media_token_id, model.config.eoc_token_id})
    # What the trainer does (training/trainer.py): the two new rows through TrainableTokenRows where it knows the
    # layout, else the dense embedding with the other rows' gradients masked.
    rows = TrainableTokenRows(model, new_rows) if TrainableTokenRows.supports(model) else None
    if rows is None:
        EmbeddingGradientMask(new_rows).register_hook(model.get_input_embeddings().weight)
    family.tokenizer.padding_side = "right"
    batch = make_batch(family.tokenizer, MMC4_TEXTS[:2], 2, interleaved=True, seed=0)
    with torch.no_grad():  # the hooked model computes what the plain one does (without dropout)
        torch.testing.assert_close(model.eval()(**batch).logits, plain.eval()(**batch).logits, atol=1e-5, rtol=1e-5)
    model.train()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    optimizer = build_optimizer(model, learning_rate=1e-2, weight_decay=0.1)
    model(**batch).loss.backward()
    optimizer.step()
    if rows is not None:
        rows.sync_()
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    embedding = next(
        n for n, p in model.named_parameters(remove_duplicate=False) if p is model.get_input_embeddings().weight
    )
    moved_modules = {name for name in changed if name.startswith("perceiver.") or ".gated_cross_attn_layer." in name}
    tied = {n for n in changed if torch.equal(after[n], after[embedding]) and n != embedding}
    assert changed - moved_modules - tied == {embedding}
    assert any(name.startswith("perceiver.") for name in changed)
    assert sum(".gated_cross_attn_layer." in name for name in changed) >= model.config.num_cross_attn_layers
    changed_rows = (after[embedding] != before[embedding]).any(dim=1).nonzero().flatten().tolist()
    assert changed_rows == new_rows


def _trainable_gradients(model, batch: dict, checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
    """The gradients of one training step's loss, and how often the first decoder layer ran."""
    model = copy.deepcopy(model).train()
    freeze_for_flamingo_training(model)
    for module in model.modules():  # the same computation on both sides
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = []  # transformers checkpoints a layer's `forward`, inside its hooks: count a submodule's calls
    leaf = next(m for m in model.decoder_layers[0].decoder_layer.modules() if list(m.parameters(recurse=False)))
    leaf.register_forward_hook(lambda *args: calls.append(1))
    model(**batch).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, len(calls)


@pytest.mark.parametrize("name", ["gpt2", "gemma2", "qwen2"])
def test_gradient_checkpointing_gives_the_same_gradients(name):
    family = Family(name)
    family.tokenizer.padding_side = "right"
    batch = make_batch(family.tokenizer, MMC4_TEXTS[:2], 2, interleaved=True, seed=0)
    expected, calls = _trainable_gradients(family.opened, batch, checkpointing=False)
    grads, checkpointed_calls = _trainable_gradients(family.opened, batch, checkpointing=True)
    assert (calls, checkpointed_calls) == (1, 2)  # the layer ran again in the backward pass
    assert grads.keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(grads[n], expected[n], atol=1e-6, rtol=1e-5, msg=n)
    assert all(expected[n].abs().sum() > 0 for n in expected if n.startswith("perceiver."))


def test_a_language_model_without_a_layer_list_gets_one_clear_error():
    lm = AutoModelForCausalLM.from_config(tiny_text_config("qwen2"))
    lm.model.layers = torch.nn.Sequential(*lm.model.layers)  # no ModuleList any more
    with pytest.raises(ValueError, match=r"Cannot find the decoder layers of Qwen2ForCausalLM: .*Qwen2Model") as err:
        find_decoder_layers_attr_name(lm)
    assert "decoder_layers_attr_name" in str(err.value)
    config = tiny_flamingo_config("qwen2", decoder_layers_attr_name="model.blocks")
    with pytest.raises(ValueError, match=r"decoder_layers_attr_name 'model.blocks' does not name .* Qwen2ForCausalLM"):
        FlamingoForConditionalGeneration(config)


def test_the_override_names_the_layers_and_layer_attributes_read_through_the_wrapper():
    config = tiny_flamingo_config("llama3", decoder_layers_attr_name="model.layers")
    model = FlamingoForConditionalGeneration(config)
    assert model.config.decoder_layers_attr_name == "model.layers"
    # Language models that read their layers' attributes in forward (e.g. `decoder_layer.attention_type` to pick a
    # sliding or global mask) read them through the wrapper.
    assert [layer.hidden_size for layer in model.decoder_layers] == [config.text_config.hidden_size] * 4
    assert model.decoder_layers[0].self_attn is model.decoder_layers[0].decoder_layer.self_attn


def test_decoder_layers_attr_names_is_deprecated():
    from modeling_flamingo import configuration

    with pytest.warns(FutureWarning, match="DECODER_LAYERS_ATTR_NAMES is deprecated"):
        table = configuration.DECODER_LAYERS_ATTR_NAMES
    assert table == {family: LAYER_PATHS[family] for family in ("llama", "gpt_neox", "mpt", "mosaic_gpt")}


# --- save/load, and the remote-code folder in a process without the package ---------------------------------------

REMOTE_SCRIPT = textwrap.dedent(
    r"""
    import importlib.abc
    import sys


    class RefusePackage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "modeling_flamingo":
                raise ImportError(f"{name} is not installed here")
            return None


    sys.meta_path.insert(0, RefusePackage())

    import torch
    from transformers import AutoModelForImageTextToText

    torch.set_num_threads(1)
    inputs = torch.load(sys.argv[2])
    out = {}
    for family, folder in inputs["folders"].items():
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            out[family] = model(**inputs["batches"][family]).logits
    out["modules"] = sorted(name for name in sys.modules if name.split(".")[0] == "modeling_flamingo")
    torch.save(out, sys.argv[1])
    """
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[dict, dict, dict, dict]:
    """Every family's open-gate model saved, its logits here, and the logits of its folder loaded with remote code
    in one fresh process where `modeling_flamingo` cannot be imported."""
    root = tmp_path_factory.mktemp("families")
    folders, batches, logits = {}, {}, {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the remote side, so that reductions split the same way
    try:
        for name in ALL_FAMILIES:
            family = Family(name)
            folders[name] = str(root / name)
            family.opened.save_pretrained(folders[name])
            batches[name] = family.encode([PROMPT, SHORT_PROMPT], padding_side="right")
            with torch.no_grad():
                logits[name] = family.opened(**batches[name]).logits
    finally:
        torch.set_num_threads(threads)
    torch.save({"folders": folders, "batches": batches}, root / "inputs.pt")
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(root / "out.pt"), str(root / "inputs.pt")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return folders, batches, logits, torch.load(root / "out.pt")


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_save_load_and_the_remote_code_folder_give_the_same_logits(saved, name):
    folders, batches, logits, remote = saved
    assert remote["modules"] == []
    config = FlamingoConfig.from_pretrained(folders[name])
    assert config.decoder_layers_attr_name == LAYER_PATHS[name]
    loaded = FlamingoForConditionalGeneration.from_pretrained(folders[name]).eval()
    with torch.no_grad():
        reloaded = loaded(**batches[name]).logits
    real = batches[name]["attention_mask"].bool()
    assert torch.equal(reloaded[real], logits[name][real])
    torch.testing.assert_close(remote[name][real], logits[name][real], atol=1e-5, rtol=0)
