"""Conversion of original OpenFlamingo checkpoints (`checkpoint.pt` + vision tower + language model) into folders
that `FlamingoForConditionalGeneration.from_pretrained` loads. Command line: `python -m modeling_flamingo.convert`
(also installed as `openflamingo-convert`); see docs/conversion.md."""

from .converter import ConversionSpec, convert
from .hub import converted_cache_root, resolve_pretrained_path
from .presets import PRESETS, Preset
from .sources import ConversionError

__all__ = [
    "PRESETS",
    "ConversionError",
    "ConversionSpec",
    "Preset",
    "convert",
    "converted_cache_root",
    "resolve_pretrained_path",
]
