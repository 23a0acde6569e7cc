"""The OpenFlamingo training loop on Accelerate.

One optimisation step is the original's (open_flamingo 2.0.1 `train_utils.train_one_epoch`): for each dataset in turn
(LAION, then MMC4) a forward pass, the loss divided by the accumulation steps and multiplied by the dataset's loss
multiplier, and a backward pass; after the last micro-batch of the accumulation window the input-embedding gradients
of every token but `<image>` and `<|endofchunk|>` are zeroed, the gradients clipped to norm 1.0, and AdamW and the
learning-rate schedule stepped. Distribution (DDP, FSDP, DeepSpeed) and mixed precision come from Accelerate; the
loop never wraps the model itself.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from modeling_flamingo.modeling_flamingo import FlamingoForConditionalGeneration
from modeling_flamingo.training.arguments import DEFAULT_MAX_CONSECUTIVE_SKIPPED_STEPS, TrainingArguments
from modeling_flamingo.training.backends import (
    MIXED_PRECISION,
    build_accelerator,
    build_trackers,
    fsdp_wrap_classes,
    select_backend,
)
from modeling_flamingo.training.export import save_original_checkpoint, save_pretrained_folder
from modeling_flamingo.training.labels import freeze_for_flamingo_training
from modeling_flamingo.training.optim import EmbeddingGradientMask, build_lr_scheduler, build_optimizer
from modeling_flamingo.training.progress import TrainingMeters, progress_bar
from modeling_flamingo.training.run_folder import (
    CHANGEABLE_ON_RESUME,
    CHECKPOINT_PREFIX,
    RUN_CONFIG_NAME,
    TRAINER_STATE_NAME,
    check_lineage,
    check_resume_config,
    check_run_folder,
    disk_write_failure,
    list_checkpoints,
    mark_run_folder,
    move_aside_later,
    read_resume_config,
    resume_config,
    weights_sha256,
)
from modeling_flamingo.training.state import TrainerState, find_latest_checkpoint, resume_checkpoint
from modeling_flamingo.training.token_rows import TrainableTokenRows, select_token_rows_strategy


class TrainLoaderLike(Protocol):
    """What `modeling_flamingo.training.data.build_train_loaders` returns per dataset."""

    dataloader: Iterable[dict[str, Any]]
    num_batches: int


# epoch -> {"laion": loader, "mmc4": loader} (in the order the step visits them)
LoaderFactory = Callable[[int], Mapping[str, TrainLoaderLike]]


class TrainingDivergedError(RuntimeError):
    """Too many optimiser steps in a row were skipped for a non-finite loss or gradient norm."""


def _as_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class FlamingoTrainer:
    """Trains a `FlamingoForConditionalGeneration` on batches of several datasets, as the original recipe does.

    Args:
        args: the typed command line (`modeling_flamingo.training.cli.parse_args`), with the names and meanings of
            the original's `train.py` flags.
        model: the model to train; its trainable set is set here (`freeze_for_flamingo_training`).
        processor: saved beside the exported model (may be None).
        loader_factory: epoch -> dataset name -> loader with `.dataloader` (yielding batch dicts: `pixel_values`
            (B, T_img, F, 3, H, W), `input_ids` (B, T), `attention_mask` (B, T), `labels` (B, T) already masked,
            optionally `skipped: dict[str, int]`) and `.num_batches`. Called once per epoch.
        accelerator: defaults to one built from `args` (mixed precision, trackers, the launch configuration).
    """

    def __init__(
        self,
        args: TrainingArguments,
        model: FlamingoForConditionalGeneration,
        processor,
        loader_factory: LoaderFactory,
        accelerator: Accelerator | None = None,
    ):
        self.args = args
        self.processor = processor
        self.loader_factory = loader_factory
        self.run_dir = Path(args.run_name)
        self.state = TrainerState()
        self.accumulation = int(args.gradient_accumulation_steps)
        if self.accumulation < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1; got {self.accumulation}.")
        self.accelerator = accelerator or build_accelerator(args)
        self.backend = select_backend(self.accelerator)
        # Nothing is written before the run folder and the resume are checked (also by the command line, before it
        # loads the model).
        resume_dir, later = self.check_run(args, self.accelerator.num_processes)
        saved_config = self._read_resume(resume_dir)
        self._prepare_model(model)
        self.multipliers: dict[str, float] = {}
        self.meters = TrainingMeters()
        self._window_bad = False
        self._changed_on_resume: list[str] = []
        if saved_config is not None:
            self._changed_on_resume = check_resume_config(
                resume_dir, saved_config, self._resume_config(), _changeable_on_resume(args)
            )
        self._prepare_training(model, resume_dir)
        if resume_dir is not None:
            self._load_checkpoint(resume_dir)
            if self._changed_on_resume:
                self._apply_new_optimisation_flags()
        self._start_run(later)

    # ------------------------------------------------------------------------------------------------------------
    # setup

    @staticmethod
    def _build_accelerator(args: TrainingArguments) -> Accelerator:
        """`backends.build_accelerator`: the command line builds the accelerator before the trainer (it seeds with
        the process index), and passes it in."""
        return build_accelerator(args)

    def _read_resume(self, resume_dir: Path | None) -> dict[str, Any] | None:
        """Take the trainer state of the checkpoint resumed from; returns its run configuration (None for a new
        run or a checkpoint of an earlier version)."""
        if resume_dir is None:
            return None
        acc = self.accelerator
        self.state = TrainerState.read(resume_dir)
        saved_config = read_resume_config(resume_dir)
        acc.print(f"Resuming from {resume_dir}.")
        if saved_config is None:
            acc.print(
                f"{resume_dir} records no run configuration (an earlier version wrote it): its flags and model "
                "cannot be checked; resume with the same ones."
            )
        return saved_config

    def _prepare_model(self, model: FlamingoForConditionalGeneration) -> None:
        """The model's trainable set (the original's, LoRA adapters if asked), gradient checkpointing, how the
        `<image>` and `<|endofchunk|>` embedding rows are trained, and the hash of the frozen weights a resume
        checks, all before Accelerate wraps the model."""
        args = self.args
        freeze_for_flamingo_training(model, train_embeddings=not args.freeze_lm_embeddings)
        if args.lora_r:
            from modeling_flamingo.training.lora import add_lora_adapters

            add_lora_adapters(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules or None)
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.rows = select_token_rows_strategy(model, not args.freeze_lm_embeddings, self.backend)
        # The frozen weights a checkpoint does not store come from `model`: their hash tells another model apart.
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        self._frozen_weights = weights_sha256(model, skip=trainable | self._checkpointed_names(model))

    def _prepare_training(self, model: FlamingoForConditionalGeneration, resume_dir: Path | None) -> None:
        """Wrap the model and AdamW for the backend, read the first epoch's loaders (their length fixes the
        schedule), and build the learning-rate schedule over the run's optimiser steps."""
        args, acc = self.args, self.accelerator
        optimizer = build_optimizer(model, args.learning_rate, args.weight_decay)
        self.backend.configure(model, args)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.unwrapped: FlamingoForConditionalGeneration = acc.unwrap_model(self.model)

        # The checkpoint of this run's lineage that --delete_previous_checkpoint may delete once the next one is
        # saved: the one it resumed from when that lies in the run folder, then the one it saved last.
        self._previous_checkpoint: Path | None = None
        if resume_dir is not None and os.path.realpath(resume_dir.parent) == os.path.realpath(self.run_dir):
            self._previous_checkpoint = resume_dir
        # Loaders of the first epoch: their length fixes the schedule.
        self._loaders = dict(self.loader_factory(self.state.epoch))
        self.batches_per_epoch = self._check_loaders(self._loaders)
        if self.state.batches_done >= self.batches_per_epoch:
            raise ValueError(
                f"{resume_dir / TRAINER_STATE_NAME} says {self.state.batches_done} batches of epoch "
                f"{self.state.epoch} were consumed, but an epoch has {self.batches_per_epoch}: resume with the data "
                "flags of the run that saved it"
            )
        steps_per_epoch = math.ceil(self.batches_per_epoch / self.accumulation)
        if args.max_steps is not None:
            # As in transformers' Trainer: max_steps overrides num_epochs (the data is run through as often as needed).
            if args.max_steps < 1:
                raise ValueError(f"max_steps must be >= 1; got {args.max_steps}.")
            self.total_steps = args.max_steps
            self.num_epochs = math.ceil(args.max_steps / steps_per_epoch)
        else:
            if args.num_epochs < 1:
                raise ValueError(f"num_epochs must be >= 1; got {args.num_epochs}.")
            self.total_steps = steps_per_epoch * args.num_epochs
            self.num_epochs = args.num_epochs
        scheduler = build_lr_scheduler(self.optimizer, args.lr_scheduler, args.warmup_steps, self.total_steps)
        self.scheduler = acc.prepare(scheduler)
        # Only the parameters that change are checkpointed (plus the embeddings, as the original saves them).
        acc.register_save_state_pre_hook(self._filter_saved_weights)

    def _start_run(self, later: list[Path]) -> None:
        """Once the resume is known to work: move the later checkpoints aside (`--move_later_checkpoints_aside`)
        and start the trackers."""
        args, acc = self.args, self.accelerator
        if later:
            acc.wait_for_everyone()  # every process checked the folder as it was before any writes
            if acc.is_main_process:
                aside = move_aside_later(self.run_dir, later)
                acc.print(f"Moved {', '.join(p.name for p in later)} and the exports of that run into {aside}.")
            acc.wait_for_everyone()
        if args.report_to:
            if acc.is_main_process:  # TensorBoard writes into the run folder: marked first
                mark_run_folder(self.run_dir)
            # The trackers were built with the accelerator (`build_trackers`): the project name is theirs.
            acc.init_trackers("openflamingo", config={k: v for k, v in asdict(args).items() if _loggable(v)})

    def _check_loaders(self, loaders: Mapping[str, TrainLoaderLike]) -> int:
        if not loaders:
            raise ValueError("No training data: give --laion_shards and/or --mmc4_shards.")
        counts = {name: int(loader.num_batches) for name, loader in loaders.items()}
        if len(set(counts.values())) != 1:
            raise ValueError(
                "Every dataset must give the same number of batches per epoch (train_num_samples // batch size, per "
                f"process), as in the original; got {counts}."
            )
        n = next(iter(counts.values()))
        if n < 1:
            raise ValueError(
                f"An epoch has no batches ({counts}): raise --train_num_samples_* or lower the batch size."
            )
        self.multipliers = {name: self.args.loss_multiplier(name) for name in loaders}
        return n

    @classmethod
    def check_run(cls, args: TrainingArguments, num_processes: int | None = None) -> tuple[Path | None, list[Path]]:
        """What a run checks before it loads a model or writes anything (reads only): `--run_name` is new or a run
        folder, resuming from the checkpoint it resumes from mixes no lineages, and the data and optimisation flags
        (and `num_processes`, when given) are those the checkpoint was saved with. Raises `RunFolderError` (a
        ValueError) naming the problem.

        Returns:
            The checkpoint folder to resume from (None for a new run), and the later checkpoints of the run folder to
            move aside (`--move_later_checkpoints_aside`; empty otherwise).
        """
        run_dir = Path(args.run_name)
        check_run_folder(run_dir)
        resume_dir = resume_checkpoint(args.run_name, args.resume_from_checkpoint)
        if resume_dir is None:
            return None, []
        step = TrainerState.read(resume_dir).global_step
        later = check_lineage(run_dir, resume_dir, step, args.move_later_checkpoints_aside)
        saved = read_resume_config(resume_dir)
        if saved is not None:
            check_resume_config(resume_dir, saved, resume_config(args, num_processes), _changeable_on_resume(args))
        return resume_dir, later

    def _apply_new_optimisation_flags(self) -> None:
        """`--resume_with_new_optimisation_flags`: the loaded schedule state holds the checkpoint's base rate and the
        optimiser its weight decay; from the resumed step on, the learning rate is the new `--learning_rate` times
        the new schedule (built over the new number of steps) at that step, and the new weight decay applies. The
        other changeable flags (clipping norm, loss multipliers) are read from the flags at every step."""
        args, schedule = self.args, self.scheduler.scheduler
        groups = self.optimizer.param_groups
        schedule.base_lrs = [args.learning_rate for _ in groups]
        for group, factor in zip(groups, schedule.lr_lambdas, strict=True):
            group["initial_lr"] = args.learning_rate
            group["lr"] = args.learning_rate * factor(schedule.last_epoch)
        schedule._last_lr = [group["lr"] for group in groups]
        groups[0]["weight_decay"] = args.weight_decay  # the decayed group (`flamingo_parameter_groups`)
        self.accelerator.print(
            f"Resumed with new {', '.join('--' + name for name in self._changed_on_resume)}: learning rate "
            f"{groups[0]['lr']:.4g} at step {self.state.global_step}."
        )

    def _resume_config(self) -> dict[str, Any]:
        return resume_config(self.args, self.accelerator.num_processes, self._frozen_weights)

    def _checkpointed_names(self, model: FlamingoForConditionalGeneration) -> set[str]:
        """The parameters a (non-FSDP) checkpoint stores: the trainable ones (but the token-rows strategy's own) and
        the input embeddings, each under one name (a head tied to the input embeddings (Qwen2, Gemma, GPT-2, MPT)
        shares their tensor, which safetensors stores once; loading that sets both)."""
        keys = {n for n, p in model.named_parameters() if p.requires_grad and not self.rows.hides_parameter(n)}
        emb = model.get_input_embeddings().weight
        keys |= {name for name, p in model.named_parameters() if p is emb}
        return keys

    def _saved_keys(self) -> set[str]:
        return self._checkpointed_names(self.unwrapped)

    @property
    def token_rows(self) -> TrainableTokenRows | None:
        """The token-rows strategy when it trains the rows through a (k, d) parameter, else None."""
        return self.rows if isinstance(self.rows, TrainableTokenRows) else None

    @property
    def embedding_mask(self) -> EmbeddingGradientMask | None:
        """The token-rows strategy when it masks the dense embedding's gradient (the original's way), else None."""
        return self.rows if isinstance(self.rows, EmbeddingGradientMask) else None

    def _filter_saved_weights(self, models, weights, output_dir) -> None:
        keep = self._saved_keys()
        for i, state in enumerate(weights):
            weights[i] = {k: v for k, v in state.items() if k in keep}

    def _load_checkpoint(self, folder: Path) -> None:
        self.backend.load_state(folder, self._saved_keys())
        self.accelerator.print(
            f"Resumed at epoch {self.state.epoch}, batch {self.state.batches_done}, step {self.state.global_step}."
        )

    # ------------------------------------------------------------------------------------------------------------
    # one step

    def _nonfinite_anywhere(self, local_bad: bool) -> bool:
        """Whether any process saw a non-finite value: every process takes the same decision."""
        if self.accelerator.num_processes == 1:
            return local_bad
        flag = torch.tensor([1.0 if local_bad else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def forward_backward(self, batches: Mapping[str, Mapping[str, Any]], sync: bool) -> dict[str, float]:
        """Forward and backward passes of one micro-step: one batch per dataset, in order.

        Args:
            batches: dataset name -> batch dict (see the class docstring); `skipped` is popped and counted.
            sync: whether this is the last micro-step of the accumulation window (gradients are synchronised across
                processes in its last backward pass only).
        Returns:
            dataset name -> loss (unscaled; NaN when it was not finite on some process and its backward skipped).
        """
        acc = self.accelerator
        losses: dict[str, float] = {}
        names = list(batches)
        for i, name in enumerate(names):
            batch = _as_device(self.meters.add_batch(name, batches[name]), acc.device)
            with acc.autocast():
                loss = self.model(**batch, use_cache=False).loss
            bad = self._nonfinite_anywhere(not bool(torch.isfinite(loss.detach()).all()))
            losses[name] = float("nan") if bad else float(loss.detach())
            if bad:
                # Every process skips this backward together, and the whole optimiser step later.
                self._window_bad = True
                continue
            scaled = loss * self.multipliers.get(name, 1.0)
            self.backend.backward(self.model, scaled, self.accumulation, sync=sync and i == len(names) - 1)
        self.backend.end_micro_step(sync, skip=self._window_bad)
        return losses

    def optimizer_step(self) -> bool:
        """Mask the embedding gradients, clip, and step AdamW and the schedule, unless a loss or the gradient norm
        was not finite on any process (then the gradients are dropped and nothing moves). Returns whether it stepped."""
        acc = self.accelerator
        stepped = False
        if not self._window_bad:
            self.rows.before_optimizer_step(self.unwrapped)
            stepped = self.backend.step(self.model, self.optimizer, self.scheduler, self.args.max_grad_norm)
        if stepped:
            self.rows.after_optimizer_step()
        self.optimizer.zero_grad(set_to_none=True)
        if stepped:
            self.state.consecutive_skipped_steps = 0
        else:
            self.state.skipped_steps += 1
            self.state.consecutive_skipped_steps += 1
            acc.print(f"step {self.state.global_step + 1}: non-finite loss or gradient, step skipped on every process")
        self._window_bad = False
        return stepped

    # ------------------------------------------------------------------------------------------------------------
    # the loop

    def train(self) -> TrainerState:
        """Run `num_epochs` epochs (or `max_steps` optimiser steps), checkpointing every `checkpointing_steps` steps
        and at the end of every epoch, and exporting at every checkpoint.

        Raises:
            TrainingDivergedError: `max_consecutive_skipped_steps` optimiser steps in a row were skipped (on every
                process alike); nothing is saved after the last checkpoint.
        """
        acc, args, state = self.accelerator, self.args, self.state
        max_skipped = args.max_consecutive_skipped_steps
        self.model.train()
        progress = progress_bar(acc, self.total_steps, state.global_step)
        while state.global_step < self.total_steps and state.epoch < self.num_epochs:
            loaders = self._loaders if self._loaders is not None else dict(self.loader_factory(state.epoch))
            self._loaders = None
            if self._check_loaders(loaders) != self.batches_per_epoch:
                raise ValueError(f"Epoch {state.epoch} has a different number of batches than the first one.")
            names = list(loaders)
            iterators = [iter(loader.dataloader) for loader in loaders.values()]
            try:
                for _ in range(state.batches_done):  # resumed mid-epoch: skip what was consumed
                    for it in iterators:
                        next(it)
            except StopIteration:
                raise ValueError(
                    f"A data loader of epoch {state.epoch} ended before the {state.batches_done} batches the resumed "
                    "checkpoint had consumed: resume with the data it was trained on."
                ) from None
            while True:
                try:
                    batches = {name: next(it) for name, it in zip(names, iterators, strict=True)}
                except StopIteration:
                    raise ValueError(
                        f"A data loader ended after {state.batches_done} of its {self.batches_per_epoch} batches."
                    ) from None
                state.batches_done += 1
                end_of_epoch = state.batches_done == self.batches_per_epoch
                sync = end_of_epoch or state.batches_done % self.accumulation == 0
                losses = self.forward_backward(batches, sync=sync)
                for name, value in losses.items():
                    self.meters.add_loss(name, value)
                if not sync:
                    continue
                self.optimizer_step()
                state.global_step += 1
                state.last_step_epoch = state.epoch
                progress.update(1)
                if end_of_epoch:
                    state.epoch += 1
                    state.batches_done = 0
                if args.logging_steps and state.global_step % args.logging_steps == 0:
                    lr = self.optimizer.param_groups[0]["lr"]
                    self.meters.log(acc, progress, state, self.total_steps, lr, bool(args.report_to))
                if max_skipped and state.consecutive_skipped_steps >= max_skipped:
                    progress.close()
                    acc.end_training()
                    raise TrainingDivergedError(self._diverged_message(max_skipped))
                finished = state.global_step >= self.total_steps
                periodic = args.checkpointing_steps and state.global_step % args.checkpointing_steps == 0
                if (periodic or end_of_epoch) and not finished:
                    self._save_checkpoint_to_wandb(self.save_checkpoint())
                if end_of_epoch or finished:
                    break
        progress.close()
        last = self.save_checkpoint()
        self._save_checkpoint_to_wandb(last)
        # One line to paste from: absolute paths, shell-quoted where needed, never followed by punctuation.
        acc.print(
            f"Training done at step {state.global_step}: model {_shell_path(self.run_dir / 'model')}  "
            f"original checkpoint {_shell_path(self.run_dir / 'checkpoint.pt')}  last checkpoint {_shell_path(last)}"
        )
        acc.end_training()
        return state

    def _diverged_message(self, limit: int) -> str:
        """One line: which steps were skipped, which weights they point at, and a checkpoint from before those."""
        state = self.state
        last_moved = state.global_step - state.consecutive_skipped_steps
        weights = f"the weights of step {last_moved}" if last_moved else "the starting weights"
        earlier = [(step, path) for step, path in list_checkpoints(self.run_dir) if step < last_moved]
        restart = (
            # The later checkpoints hold the diverged weights: the resume moves them aside and takes the new rate.
            f"resume from {max(earlier)[1]} with --move_later_checkpoints_aside --resume_with_new_optimisation_flags"
            if earlier
            else "start again in a new --run_name"
        )
        return (
            f"training stopped at step {state.global_step}: steps {last_moved + 1} to {state.global_step} were all "
            f"skipped because a loss or the gradient norm was not finite (NaN or inf), so {weights} (in every "
            f"checkpoint saved since) diverged or the data is bad; lower --learning_rate (now "
            f"{self.args.learning_rate:g}) or check the data, then {restart} (--max_consecutive_skipped_steps {limit} "
            "set this limit)"
        )

    def _save_checkpoint_to_wandb(self, folder: Path) -> None:
        """`--save_checkpoints_to_wandb`: the checkpoint folder's files and `checkpoint.pt` into the W&B run's files,
        named as in the run folder (the original `wandb.save`s its checkpoint file and final weights)."""
        if not self.args.save_checkpoints_to_wandb or not self.accelerator.is_main_process:
            return
        run = self.accelerator.get_tracker("wandb", unwrap=True)
        base = self.run_dir.resolve()
        files = [*sorted(p for p in folder.rglob("*") if p.is_file()), self.run_dir / "checkpoint.pt"]
        for path in files:
            run.save(str(path.resolve()), base_path=str(base), policy="now")

    # ------------------------------------------------------------------------------------------------------------
    # checkpoints and exports

    def save_checkpoint(self) -> Path:
        """Save the full training state (`checkpoint_<step>/`, through `accelerator.save_state`, written under a
        temporary name and renamed when complete) and the exports `model/` and `checkpoint.pt`."""
        acc, state = self.accelerator, self.state
        final = self.run_dir / f"{CHECKPOINT_PREFIX}{state.global_step}"
        partial = self.run_dir / f".{final.name}.partial"
        if acc.is_main_process:
            mark_run_folder(self.run_dir)
            shutil.rmtree(partial, ignore_errors=True)
        acc.wait_for_everyone()
        try:
            acc.save_state(str(partial))
            if acc.is_main_process:
                (partial / TRAINER_STATE_NAME).write_text(json.dumps(asdict(state), indent=2) + "\n")
                (partial / RUN_CONFIG_NAME).write_text(json.dumps(self._resume_config(), indent=2) + "\n")
            self.export()
        except BaseException as exc:
            # The previous checkpoint and exports stay as they were (the exports are replaced only when complete).
            if acc.is_main_process:
                shutil.rmtree(partial, ignore_errors=True)
            failure = disk_write_failure(exc)
            if failure is None:
                raise
            latest = self._previous_checkpoint or find_latest_checkpoint(self.run_dir)
            kept = f"{latest} is intact" if latest is not None else "no checkpoint was saved before"
            raise OSError(
                f"could not save {final}: {failure}; {kept}: free space under {self.run_dir} and rerun the same "
                "command to resume"
            ) from exc
        acc.wait_for_everyone()
        if acc.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
            previous = self._previous_checkpoint
            if self.args.delete_previous_checkpoint and previous is not None and previous.name != final.name:
                shutil.rmtree(previous, ignore_errors=True)
        self._previous_checkpoint = final
        acc.wait_for_everyone()
        return final

    def export(self) -> None:
        """Write `{run_name}/model/` (`save_pretrained`, processor included) and `{run_name}/checkpoint.pt` (original
        v2 layout) from the current weights."""
        acc = self.accelerator
        state_dict = acc.get_state_dict(self.model)  # collective under FSDP / DeepSpeed
        if not acc.is_main_process:
            return
        model = self.unwrapped
        from modeling_flamingo.training.lora import has_lora, merged_state_dict, save_lora_adapter

        if has_lora(model):
            # The adapter as PEFT files; the exports carry the merged weights (the original layout has no LoRA).
            save_lora_adapter(model, self.run_dir / "adapter", state_dict)
            state_dict = merged_state_dict(model, state_dict)
        save_original_checkpoint(model, self.run_dir / "checkpoint.pt", state_dict=state_dict)
        # save_pretrained consumes the dict it is given: a shallow copy keeps ours intact.
        save_pretrained_folder(model, self.processor, self.run_dir / "model", state_dict=dict(state_dict))


def _shell_path(path: Path) -> str:
    """`path` made absolute, quoted only where a shell needs it: pasted as is into a later command."""
    return shlex.quote(str(path.resolve()))


def _changeable_on_resume(args: TrainingArguments) -> tuple[str, ...]:
    return CHANGEABLE_ON_RESUME if args.resume_with_new_optimisation_flags else ()


def _loggable(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


def seed_everything(seed: int, rank: int = 0) -> None:
    """The original seeds `seed + rank` on every process (torch, numpy, random)."""
    set_seed(seed + rank)


__all__ = [
    "DEFAULT_MAX_CONSECUTIVE_SKIPPED_STEPS",
    "MIXED_PRECISION",
    "FlamingoTrainer",
    "LoaderFactory",
    "TrainLoaderLike",
    "TrainerState",
    "TrainingDivergedError",
    "build_trackers",
    "find_latest_checkpoint",
    "fsdp_wrap_classes",
    "seed_everything",
]
