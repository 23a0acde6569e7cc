"""Training OpenFlamingo's connecting modules (resampler, gated cross-attention) as the original recipe does.

`modeling_flamingo.training` is the top-level `training/` folder of the repository.
"""

from modeling_flamingo.training.labels import freeze_for_flamingo_training, mask_flamingo_labels

__all__ = ["freeze_for_flamingo_training", "mask_flamingo_labels"]
