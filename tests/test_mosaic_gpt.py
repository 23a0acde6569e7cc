"""Tests of the native MosaicGPT (MPT-1B) port against golden outputs of the original remote code.

The fixtures come from `tests/fixtures/make_mosaic_gpt_golden.py` (see its docstring for how they were made).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from modeling_flamingo.configuration.configuration_mosaic_gpt import MosaicGPTConfig
from modeling_flamingo.modeling_mosaic_gpt import CACHE_NAME, MosaicGPTBlock, MosaicGPTForCausalLM, MosaicGPTModel

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN_CASES = ("mosaic_gpt_golden", "mosaic_gpt_golden_variant")
ATTN_IMPLS = ("eager", "sdpa")

try:
    AutoConfig.register("mosaic_gpt", MosaicGPTConfig)
except ValueError:  # already registered (the package __init__ does it)
    pass
try:
    AutoModelForCausalLM.register(MosaicGPTConfig, MosaicGPTForCausalLM)
except ValueError:
    pass


def load_golden(name: str) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(hub-style config dict, remote state dict, golden inputs/outputs)."""
    config = json.loads((FIXTURES / f"{name}_config.json").read_text())
    tensors = load_file(FIXTURES / f"{name}.safetensors")
    prefix = "state_dict."
    state_dict = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    golden = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
    return config, state_dict, golden


def write_hub_folder(folder: Path, config: dict, state_dict: dict[str, torch.Tensor]) -> Path:
    """A folder laid out like the hub repository: config.json (with `auto_map`) and pytorch_model.bin."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(state_dict, folder / "pytorch_model.bin")
    return folder


def tiny_model(attn_implementation: str = "eager", seed: int = 0, **overrides) -> MosaicGPTForCausalLM:
    """A random tiny MPT-1B-layout model whose LayerNorms are not the identity."""
    kwargs = dict(
        d_model=32,
        n_heads=4,
        n_layers=2,
        vocab_size=100,
        max_seq_len=32,
        attn_impl="torch",
        attn_qk_ln=True,
        alibi=True,
        no_bias=True,
    )
    kwargs.update(overrides)
    config = MosaicGPTConfig(**kwargs)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = MosaicGPTForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * torch.randn_like(param))
    return model


def left_padded_batch(
    lengths: tuple[int, ...], width: int, vocab: int = 100, seed: int = 0
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """(B, width) ids and mask, row i holding lengths[i] real tokens at the right."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab, (len(lengths), width), generator=generator)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, : width - length] = 0
        attention_mask[row, width - length :] = 1
    return input_ids, attention_mask


# ---------------------------------------------------------------------------------------------------------------
# (a) golden logits of the remote code


@pytest.mark.parametrize("attn_implementation", ATTN_IMPLS)
@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_golden_logits(tmp_path: Path, name: str, attn_implementation: str) -> None:
    config, state_dict, golden = load_golden(name)
    folder = write_hub_folder(tmp_path / name, config, state_dict)

    model, info = MosaicGPTForCausalLM.from_pretrained(
        folder, output_loading_info=True, attn_implementation=attn_implementation
    )
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert set(model.state_dict()) == set(state_dict)
    for key, value in state_dict.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    model.eval()

    mask = golden["attention_mask"].bool()
    with torch.no_grad():
        out = model(golden["input_ids"], attention_mask=golden["attention_mask"], use_cache=True)
        step = model(
            golden["next_input_ids"],
            attention_mask=golden["next_attention_mask"],
            past_key_values=out.past_key_values,
            use_cache=True,
        )
    # Real tokens must match; pad positions carry no meaning, they only have to stay finite.
    torch.testing.assert_close(out.logits[mask], golden["logits"][mask], rtol=0, atol=1e-5)
    assert torch.isfinite(out.logits).all()
    torch.testing.assert_close(step.logits, golden["next_logits"], rtol=0, atol=1e-5)


def test_hub_config_and_auto_classes(tmp_path: Path) -> None:
    config_dict, state_dict, golden = load_golden("mosaic_gpt_golden")
    config = MosaicGPTConfig.from_dict(config_dict)
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (32, 4, 2)
    assert config.no_bias and config.alibi and config.attn_qk_ln and config.tie_word_embeddings
    assert not hasattr(config, "auto_map")  # remote-code pointer dropped: nothing here ships those files

    folder = write_hub_folder(tmp_path / "hub", config_dict, state_dict)
    assert isinstance(AutoConfig.from_pretrained(folder), MosaicGPTConfig)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert isinstance(model, MosaicGPTForCausalLM)
    # the hub config says `use_cache: false`; `forward` keeps that default, `generate` still caches
    assert model.config.use_cache is False and model.generation_config.use_cache is True
    assert all(isinstance(block, MosaicGPTBlock) for block in model.transformer.blocks)
    mask = golden["attention_mask"].bool()
    with torch.no_grad():
        logits = model(golden["input_ids"], attention_mask=golden["attention_mask"]).logits
    torch.testing.assert_close(logits[mask], golden["logits"][mask], rtol=0, atol=1e-5)


def test_no_bias_checkpoint_with_bias_keys_loads_like_remote(tmp_path: Path) -> None:
    """With `no_bias` the remote code deleted its biases, so bias keys in a file were never used: same here."""
    config_dict, state_dict, golden = load_golden("mosaic_gpt_golden")
    with_biases = dict(state_dict)
    with_biases["transformer.blocks.0.attn.Wqkv.bias"] = torch.ones(3 * config_dict["d_model"])
    with_biases["transformer.ln_f.bias"] = torch.ones(config_dict["d_model"])
    folder = write_hub_folder(tmp_path / "biased", config_dict, with_biases)
    model, info = MosaicGPTForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not any(name.endswith(".bias") for name, _ in model.named_parameters())
    mask = golden["attention_mask"].bool()
    with torch.no_grad():
        logits = model.eval()(golden["input_ids"], attention_mask=golden["attention_mask"]).logits
    torch.testing.assert_close(logits[mask], golden["logits"][mask], rtol=0, atol=1e-5)


def test_loss_matches_shifted_cross_entropy() -> None:
    model = tiny_model()
    input_ids, _ = left_padded_batch((8, 8), 8)
    labels = input_ids.clone()
    labels[0, :3] = -100
    out = model(input_ids, labels=labels)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 100), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


# ---------------------------------------------------------------------------------------------------------------
# (b) left padding


@pytest.mark.parametrize("alibi", [True, False])
@pytest.mark.parametrize("attn_implementation", ATTN_IMPLS)
def test_left_padded_batch_matches_single_samples(attn_implementation: str, alibi: bool) -> None:
    model = tiny_model(attn_implementation, alibi=alibi, no_bias=not alibi)
    lengths = (9, 5, 2)
    input_ids, attention_mask = left_padded_batch(lengths, 9)
    with torch.no_grad():
        batched = model(input_ids, attention_mask=attention_mask).logits
        for row, length in enumerate(lengths):
            alone = model(input_ids[row : row + 1, 9 - length :]).logits[0]
            torch.testing.assert_close(batched[row, 9 - length :], alone, rtol=0, atol=1e-5)
    assert torch.isfinite(batched).all()


# ---------------------------------------------------------------------------------------------------------------
# (c) cache


@pytest.mark.parametrize("attn_implementation", ATTN_IMPLS)
def test_cached_decoding_matches_full_forward(attn_implementation: str) -> None:
    model = tiny_model(attn_implementation)
    input_ids, attention_mask = left_padded_batch((12, 7), 12)
    with torch.no_grad():
        full = model(input_ids, attention_mask=attention_mask).logits
        out = model(input_ids[:, :6], attention_mask=attention_mask[:, :6], use_cache=True)
        pieces = [out.logits]
        cache = out.past_key_values
        # one chunk of two tokens (several queries against the cache), then single tokens
        for start, end in ((6, 8), (8, 9), (9, 10), (10, 11), (11, 12)):
            step = model(
                input_ids[:, start:end], attention_mask=attention_mask[:, :end], past_key_values=cache, use_cache=True
            )
            assert step.past_key_values is cache and cache.get_seq_length() == end
            pieces.append(step.logits)
    incremental = torch.cat(pieces, dim=1)
    mask = attention_mask.bool()
    torch.testing.assert_close(incremental[mask], full[mask], rtol=0, atol=1e-5)


@pytest.mark.parametrize("argument", ["cache", "past_key_values"])
def test_cache_is_accepted_under_either_name(argument: str) -> None:
    """transformers >= 5.24 passes the cache as `cache` (`generate`, gradient checkpointing layers), earlier releases
    as `past_key_values`: either name continues from it, and the output holds it under the installed release's name."""
    model = tiny_model("sdpa")
    input_ids, attention_mask = left_padded_batch((8, 5), 8)
    with torch.no_grad():
        full = model(input_ids, attention_mask=attention_mask).logits
        cache = getattr(model(input_ids[:, :6], attention_mask=attention_mask[:, :6], use_cache=True), CACHE_NAME)
        step = model(input_ids[:, 6:], attention_mask=attention_mask, use_cache=True, **{argument: cache})
        assert getattr(step, CACHE_NAME) is cache and cache.get_seq_length() == 8
        torch.testing.assert_close(step.logits, full[:, 6:], rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="not both"):
            model(input_ids[:, 6:], attention_mask=attention_mask, cache=cache, past_key_values=cache)


# ---------------------------------------------------------------------------------------------------------------
# (d) generate


def manual_greedy(model: MosaicGPTForCausalLM, input_ids, attention_mask, steps: int) -> torch.LongTensor:
    """Greedy decoding with full forwards and no cache."""
    with torch.no_grad():
        for _ in range(steps):
            next_token = model(input_ids, attention_mask=attention_mask).logits[:, -1].argmax(-1, keepdim=True)
            input_ids = torch.cat([input_ids, next_token], dim=1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(next_token)], dim=1)
    return input_ids


@pytest.mark.parametrize("attn_implementation", ATTN_IMPLS)
def test_generate(attn_implementation: str) -> None:
    model = tiny_model(attn_implementation)
    input_ids, attention_mask = left_padded_batch((6, 3), 6)
    common = dict(attention_mask=attention_mask, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)

    cached = model.generate(input_ids, return_dict_in_generate=True, **common)  # caches by default
    uncached = model.generate(input_ids, use_cache=False, **common)
    assert cached.past_key_values is not None and cached.past_key_values.get_seq_length() == 6 + 8 - 1
    assert torch.equal(cached.sequences, uncached)
    assert torch.equal(cached.sequences, manual_greedy(model, input_ids, attention_mask, 8))

    beams = model.generate(input_ids, num_beams=3, num_return_sequences=2, **common)
    assert beams.shape == (4, 6 + 8)
    assert torch.equal(beams[::2, :6], input_ids) and torch.equal(beams[1::2, :6], input_ids)

    torch.manual_seed(0)
    sampled = model.generate(input_ids, **{**common, "do_sample": True, "top_k": 10})
    assert sampled.shape == (2, 14) and torch.equal(sampled[:, :6], input_ids)


# ---------------------------------------------------------------------------------------------------------------
# (e) resizing keeps the logits tied to wte


def test_resize_token_embeddings_keeps_logits_tied() -> None:
    model = tiny_model()
    assert model.get_output_embeddings() is None
    assert not any("lm_head" in key for key in model.state_dict())
    input_ids, attention_mask = left_padded_batch((7, 4), 7, vocab=60)
    with torch.no_grad():
        before = model(input_ids, attention_mask=attention_mask).logits

    model.resize_token_embeddings(80)
    model.tie_weights()  # must be a no-op: there is nothing to tie
    wte = model.get_input_embeddings()
    assert wte is model.transformer.wte and wte.weight.shape == (80, 32)
    assert model.config.vocab_size == 80
    with torch.no_grad():
        out = model(input_ids, attention_mask=attention_mask, output_hidden_states=True)
    assert out.logits.shape[-1] == 80
    torch.testing.assert_close(out.logits, F.linear(out.hidden_states[-1], wte.weight))
    torch.testing.assert_close(out.logits, before[..., :80], rtol=0, atol=1e-6)

    model.resize_token_embeddings(120)
    with torch.no_grad():
        grown = model(input_ids, attention_mask=attention_mask).logits
        wte.weight.zero_()  # the old module is gone: logits must follow the new one
        model.get_input_embeddings().weight[:, 0] = 1.0
        probe = model(input_ids, attention_mask=attention_mask, output_hidden_states=True)
    assert grown.shape[-1] == 120 and model.config.vocab_size == 120
    torch.testing.assert_close(grown[..., :80], before[..., :80], rtol=0, atol=1e-6)
    torch.testing.assert_close(probe.logits, probe.hidden_states[-1][..., :1].expand(-1, -1, 120))

    labels = input_ids.clone()
    loss = model(input_ids, labels=labels).loss
    assert torch.isfinite(loss)


def test_tied_logits_come_from_the_embedding_modules_own_call() -> None:
    # Wrappers that gather a sharded module's weight in its forward hooks (FSDP2) must see the head's use of the
    # embedding too: the logits are computed by calling the module, not by reading `.weight` from outside.
    model = tiny_model()
    wte = model.get_input_embeddings()
    calls = []
    wte.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs.get("unembed", False)), with_kwargs=True
    )
    input_ids, attention_mask = left_padded_batch((7, 4), 7)
    with torch.no_grad():
        out = model(input_ids, attention_mask=attention_mask, output_hidden_states=True)
    assert calls == [False, True]
    torch.testing.assert_close(out.logits, F.linear(out.hidden_states[-1], wte.weight), rtol=0, atol=0)

    # A plain embedding put in by `set_input_embeddings` still gives the tied logits.
    model.set_input_embeddings(torch.nn.Embedding.from_pretrained(wte.weight.detach().clone(), freeze=False))
    with torch.no_grad():
        plain = model(input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(plain, out.logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# (f) gradient checkpointing


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_same_gradients(use_reentrant: bool) -> None:
    config_dict, state_dict, _ = load_golden("mosaic_gpt_golden_variant")  # biases, learned positions, clipping
    config = MosaicGPTConfig.from_dict(config_dict)
    config._attn_implementation = "eager"
    input_ids, attention_mask = left_padded_batch((10, 10), 10)
    labels = input_ids.clone()

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = MosaicGPTForCausalLM(config)
        model.load_state_dict(state_dict)
        if checkpointing:
            # transformers 5.23 names it activation_checkpointing_enable; 5.20 only has the older name.
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable({"use_reentrant": use_reentrant})
            assert all(block.gradient_checkpointing for block in model.transformer.blocks)
        model.train()
        calls = []
        for block in model.transformer.blocks:
            block.ln_1.register_forward_pre_hook(lambda *_: calls.append(1))
        model(input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
        # checkpointed blocks start their forward again during backward (recompute)
        assert len(calls) == config.n_layers * (2 if checkpointing else 1)
        return {name: param.grad.clone() for name, param in model.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert plain[name].abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_embedding_fraction_scales_embedding_gradient_only() -> None:
    ids = torch.randint(1, 100, (1, 6), generator=torch.Generator().manual_seed(3))
    results = {}
    for fraction in (1.0, 0.25):
        model = tiny_model(embedding_fraction=fraction)
        embeds = model.transformer.wte(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds).logits
        logits.sum().backward()
        results[fraction] = (logits.detach(), embeds.grad)
    torch.testing.assert_close(results[0.25][0], results[1.0][0])
    torch.testing.assert_close(results[0.25][1], 0.25 * results[1.0][1])


# ---------------------------------------------------------------------------------------------------------------
# (g) save / load


def test_save_pretrained_round_trip(tmp_path: Path) -> None:
    model = tiny_model("sdpa")
    model.resize_token_embeddings(90)
    model.save_pretrained(tmp_path / "saved")
    saved_config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved_config["model_type"] == "mosaic_gpt" and "auto_map" not in saved_config
    assert saved_config["vocab_size"] == 90

    loaded, info = MosaicGPTForCausalLM.from_pretrained(tmp_path / "saved", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    loaded.eval()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    input_ids, attention_mask = left_padded_batch((5, 3), 5, vocab=90)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids, attention_mask=attention_mask).logits,
            model(input_ids, attention_mask=attention_mask).logits,
        )

    base = MosaicGPTModel.from_pretrained(tmp_path / "saved")  # the decoder alone, from the causal-LM file
    torch.testing.assert_close(base.wte.weight, model.transformer.wte.weight)


# ---------------------------------------------------------------------------------------------------------------
# misc API


def test_fresh_weights_follow_the_remote_init() -> None:
    """kaiming_normal_ (relu, fan_in) on every weight, residual projections divided by sqrt(2 * n_layers)."""
    torch.manual_seed(0)
    config = MosaicGPTConfig(d_model=128, n_heads=4, n_layers=2, vocab_size=512, alibi=True, attn_qk_ln=True)
    model = MosaicGPTForCausalLM(config)
    kaiming_std = (2 / 128) ** 0.5
    block = model.transformer.blocks[0]
    for part in block.attn.Wqkv.weight.chunk(3):
        assert abs(part.std().item() / kaiming_std - 1) < 0.05
    assert abs(block.attn.out_proj.weight.std().item() * 2 / kaiming_std - 1) < 0.05
    assert abs(block.mlp.mlp_down.weight.std().item() * 2 / (2 / 512) ** 0.5 - 1) < 0.05
    assert abs(model.transformer.wte.weight.std().item() / kaiming_std - 1) < 0.05
    assert torch.equal(block.attn.q_ln.weight, torch.ones(128)) and torch.equal(block.ln_1.bias, torch.zeros(128))


def test_outputs_and_logits_to_keep() -> None:
    model = tiny_model()
    input_ids, attention_mask = left_padded_batch((6, 4), 6)
    with torch.no_grad():
        full = model(input_ids, attention_mask=attention_mask, output_hidden_states=True)
        last = model(input_ids, attention_mask=attention_mask, logits_to_keep=1)
        with_ids = model(input_ids, attention_mask=attention_mask, position_ids=torch.zeros_like(input_ids))
        embeds = model(inputs_embeds=model.transformer.wte(input_ids), attention_mask=attention_mask)
    assert len(full.hidden_states) == model.config.n_layers + 1
    torch.testing.assert_close(last.logits, full.logits[:, -1:])
    torch.testing.assert_close(with_ids.logits, full.logits)  # position_ids are ignored (ALiBi)
    torch.testing.assert_close(embeds.logits, full.logits)

    eager = tiny_model("eager")
    with torch.no_grad():
        attentions = eager(input_ids, attention_mask=attention_mask, output_attentions=True).attentions
    assert len(attentions) == 2 and attentions[0].shape == (2, 4, 6, 6)
    assert torch.all(attentions[0][1, :, 2:, :2] == 0)  # real tokens never attend to padding
