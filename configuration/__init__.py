from .configuration_flamingo import FlamingoConfig


def __getattr__(name: str):
    if name == "DECODER_LAYERS_ATTR_NAMES":  # deprecated: warns on use, not on import
        from . import configuration_flamingo

        return configuration_flamingo.DECODER_LAYERS_ATTR_NAMES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FlamingoConfig"]
