"""Training OpenFlamingo's connecting modules (resampler, gated cross-attention) as the original recipe does.

`modeling_flamingo.training` is the top-level `training/` folder of the repository. Command line:
`accelerate launch -m modeling_flamingo.training ...` or `openflamingo-train` (see docs/training.md).
"""

from modeling_flamingo.training.arguments import TrainingArguments
from modeling_flamingo.training.cli import CONFIGS_DIR
from modeling_flamingo.training.export import (
    original_checkpoint_state_dict,
    save_original_checkpoint,
    save_pretrained_folder,
)
from modeling_flamingo.training.labels import freeze_for_flamingo_training, mask_flamingo_labels
from modeling_flamingo.training.model_init import assemble_flamingo, build_fresh_flamingo
from modeling_flamingo.training.optim import (
    EmbeddingGradientMask,
    build_lr_scheduler,
    build_optimizer,
    flamingo_parameter_groups,
)
from modeling_flamingo.training.run_folder import RunFolderError
from modeling_flamingo.training.token_rows import TrainableTokenRows
from modeling_flamingo.training.trainer import (
    FlamingoTrainer,
    TrainerState,
    TrainingDivergedError,
    find_latest_checkpoint,
)

__all__ = [
    "CONFIGS_DIR",
    "EmbeddingGradientMask",
    "FlamingoTrainer",
    "RunFolderError",
    "TrainableTokenRows",
    "TrainerState",
    "TrainingArguments",
    "TrainingDivergedError",
    "assemble_flamingo",
    "build_fresh_flamingo",
    "build_lr_scheduler",
    "build_optimizer",
    "find_latest_checkpoint",
    "flamingo_parameter_groups",
    "freeze_for_flamingo_training",
    "mask_flamingo_labels",
    "original_checkpoint_state_dict",
    "save_original_checkpoint",
    "save_pretrained_folder",
]
