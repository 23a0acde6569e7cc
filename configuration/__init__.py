from .configuration_flamingo import DECODER_LAYERS_ATTR_NAMES, FlamingoConfig

__all__ = ["DECODER_LAYERS_ATTR_NAMES", "FlamingoConfig"]
