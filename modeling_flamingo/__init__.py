"""OpenFlamingo as first-class transformers models.

Importing the package registers `openflamingo` and `mosaic_gpt` with transformers' Auto classes.
"""

from modeling_flamingo.configuration.configuration_flamingo import FlamingoConfig
from modeling_flamingo.configuration.configuration_mosaic_gpt import MosaicGPTConfig
from modeling_flamingo.modeling_flamingo import FlamingoForConditionalGeneration, FlamingoPreTrainedModel
from modeling_flamingo.modeling_mosaic_gpt import MosaicGPTForCausalLM
from modeling_flamingo.processing import FlamingoImageProcessor, FlamingoProcessor

__all__ = [
    "FlamingoConfig",
    "FlamingoForConditionalGeneration",
    "FlamingoImageProcessor",
    "FlamingoPreTrainedModel",
    "FlamingoProcessor",
    "MosaicGPTConfig",
    "MosaicGPTForCausalLM",
]
