"""OpenFlamingo as first-class transformers models."""

from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

from modeling_flamingo.configuration.configuration_flamingo import FlamingoConfig
from modeling_flamingo.modeling_flamingo import FlamingoForConditionalGeneration, FlamingoPreTrainedModel

try:  # the native MosaicGPT (MPT-1B) classes
    from modeling_flamingo.configuration.configuration_mosaic_gpt import MosaicGPTConfig
    from modeling_flamingo.modeling_mosaic_gpt import MosaicGPTForCausalLM
except ImportError:  # pragma: no cover - only while the module is being written
    MosaicGPTConfig = MosaicGPTForCausalLM = None


if MosaicGPTConfig is not None:
    AutoConfig.register("mosaic_gpt", MosaicGPTConfig, exist_ok=True)
    AutoModelForCausalLM.register(MosaicGPTConfig, MosaicGPTForCausalLM, exist_ok=True)
AutoConfig.register("openflamingo", FlamingoConfig, exist_ok=True)
AutoModelForImageTextToText.register(FlamingoConfig, FlamingoForConditionalGeneration, exist_ok=True)

from modeling_flamingo.processing import FlamingoImageProcessor, FlamingoProcessor  # noqa: E402

__all__ = [
    "FlamingoConfig",
    "FlamingoForConditionalGeneration",
    "FlamingoImageProcessor",
    "FlamingoPreTrainedModel",
    "FlamingoProcessor",
    "MosaicGPTConfig",
    "MosaicGPTForCausalLM",
]
