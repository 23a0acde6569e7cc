from .image_processing_flamingo import FlamingoImageProcessor
from .processing_flamingo import FlamingoProcessor

__all__ = ["FlamingoImageProcessor", "FlamingoProcessor"]
