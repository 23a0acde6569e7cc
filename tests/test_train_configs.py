"""The accelerate configurations shipped with the training loop, the FSDP units, and the gradient mask's row
arithmetic (what FSDP2's row-sharded gradients rely on)."""

from __future__ import annotations

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

from modeling_flamingo import FlamingoForConditionalGeneration
from modeling_flamingo.testing import tiny_flamingo_config
from modeling_flamingo.training import CONFIGS_DIR, EmbeddingGradientMask
from modeling_flamingo.training.trainer import fsdp_wrap_classes


def test_every_config_loads_with_accelerate():
    names = sorted(p.name for p in CONFIGS_DIR.glob("*.yaml"))
    assert names == ["ddp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml", "fsdp_full.yaml", "fsdp_hybrid.yaml"]
    configs = {name: load_config_from_file(str(CONFIGS_DIR / name)) for name in names}
    assert configs["ddp.yaml"].distributed_type == DistributedType.MULTI_GPU
    for name in ("fsdp_full.yaml", "fsdp_hybrid.yaml"):
        config = configs[name]
        assert config.distributed_type == DistributedType.FSDP
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert config.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    hybrid = configs["fsdp_hybrid.yaml"].parallelism_config
    sizes = hybrid["parallelism_config_dp_replicate_size"] * hybrid["parallelism_config_dp_shard_size"]
    assert sizes == configs["fsdp_hybrid.yaml"].num_processes
    assert hybrid["parallelism_config_dp_replicate_size"] == configs["fsdp_hybrid.yaml"].num_machines
    for stage in (2, 3):
        config = configs[f"deepspeed_zero{stage}.yaml"]
        assert config.distributed_type == DistributedType.DEEPSPEED
        assert config.deepspeed_config["zero_stage"] == stage
        assert config.deepspeed_config["gradient_clipping"] == 1.0  # the original's clip_grad_norm_(1.0)


@pytest.mark.parametrize(
    ("family", "decoder_layer"),
    [
        ("llama", "LlamaDecoderLayer"),
        ("gpt_neox", "GPTNeoXLayer"),
        ("mpt", "MptBlock"),
        ("mosaic_gpt", "MosaicGPTBlock"),
    ],
)
def test_fsdp_units_are_the_model_s_own_layer_classes(family, decoder_layer):
    with torch.device("meta"):
        model = FlamingoForConditionalGeneration(tiny_flamingo_config(family))
    classes = fsdp_wrap_classes(model)
    assert {
        "CLIPEncoderLayer",
        "FlamingoPerceiverResampler",
        "FlamingoGatedCrossAttentionBlock",
        decoder_layer,
    } <= set(classes)
    other_layers = {"LlamaDecoderLayer", "GPTNeoXLayer", "MptBlock", "MosaicGPTBlock"} - {decoder_layer}
    assert not other_layers & set(classes)


def test_gradient_mask_keeps_only_the_new_token_rows_of_any_row_shard():
    mask = EmbeddingGradientMask([7, 3])
    weight = torch.nn.Parameter(torch.randn(10, 4))
    weight.grad = torch.ones(10, 4)
    mask.apply(weight)
    assert weight.grad.sum(1).tolist() == [0, 0, 0, 4, 0, 0, 0, 4, 0, 0]
    # A shard of rows 5..9 (as FSDP2 gives each rank): only row 7 (local row 2) is kept.
    assert mask.row_mask(5, start=5)[:, 0].tolist() == [0, 0, 1, 0, 0]
    assert mask.row_mask(3, start=0)[:, 0].tolist() == [0, 0, 0]
    # The hook variant (one process, DDP, DeepSpeed) masks the gradient before it is accumulated.
    other = torch.nn.Parameter(torch.randn(10, 4))
    mask.register_hook(other)
    (other * 2).sum().backward()
    assert other.grad.sum(1).tolist() == [0, 0, 0, 8, 0, 0, 0, 8, 0, 0]
    with pytest.raises(ValueError, match="token id 7 is outside the input embeddings"):
        mask.apply(torch.nn.Parameter(torch.zeros(5, 2)))
