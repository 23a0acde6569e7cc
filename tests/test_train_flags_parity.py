"""Training flags that the step tests leave at their defaults, each run through our trainer and, where the original
has the behaviour, through the original's own `train_one_epoch` (open_flamingo 2.0.1) from the same weights and
batches (the machinery of tests/test_train_step.py):

- `--freeze_lm_embeddings`: losses, gradients and weights after the step; the embeddings (and a head tied to them)
  do not move.
- gradient clipping at work: a step whose pre-clip norm exceeds `--max_grad_norm` (1.0, the original's hard-coded
  value), clipped the same way.
- `--lr_scheduler linear` / `cosine` with warmup: the learning rate of every step and the weights after the steps.
- `--precision amp_bf16`: the loss computed under bf16 autocast, and a step with a non-finite MMC4 loss skipped by
  both loops. The original's `get_autocast` builds `torch.cuda.amp.autocast`, which does nothing on the CPU: its side
  is driven with the CPU's bf16 autocast in its place, the context the flag means.

Flags of this package only: `--lora_target_modules` / `--lora_dropout` as parsed by the command line put adapters on
exactly the named modules with that dropout; `--tokenizer_path` with `--init_from` is the tokenizer a run trains and
exports with; `--mmc4_image_order` and `--no_flip` reach the batches of the loaders the command line builds.

Not compared here: `--precision fp16` (the original's "amp"). On the CPU, Accelerate runs no fp16 autocast nor a
gradient scaler, so the trainer refuses it there (tests/test_train_precision.py); fp16 numerics need a GPU.
"""

from __future__ import annotations

import dataclasses
from unittest import mock

import pytest
import torch
from transformers import AutoTokenizer

from modeling_flamingo.training import FlamingoTrainer

from reference import build_original, ours_from_original
from train_helpers import (
    LAION_TEXTS,
    MMC4_TEXTS,
    MULTIPLIERS,
    ListLoader,
    fresh_accelerate_state,
    make_batch,
    original_train_args,
    tiny_model,
    tiny_processor,
    train_args,
)
from train_reference import (
    DDPLike,
    canonical_name,
    grads_as_original,
    original_batches,
    original_name,
    original_param_groups,
    train_utils,
)

# MPT: the family of the released 3B/9B models, whose output head is tied to the input embeddings.
FAMILY = "mpt"
LR = 1e-3


class _Loader(list):
    """The original's loader interface: iterable, with `num_batches`."""

    @property
    def num_batches(self) -> int:
        return len(self)


def _batches(tokenizer, steps: int) -> tuple[list[dict], list[dict]]:
    laion = [make_batch(tokenizer, LAION_TEXTS[i % 2 : i % 2 + 3], 1, False, seed=1 + i) for i in range(steps)]
    mmc4 = [make_batch(tokenizer, MMC4_TEXTS[i % 2 : i % 2 + 3], 2, True, seed=50 + i) for i in range(steps)]
    return laion, mmc4


def _models(freeze_lm_embeddings: bool = False):
    original, tokenizer = build_original(FAMILY)
    ours = ours_from_original(original, tokenizer, FAMILY).train()
    if freeze_lm_embeddings:  # what the original's create_model_and_transforms(freeze_lm_embeddings=True) does
        original.lang_encoder.get_input_embeddings().requires_grad_(False)
    return original.train(), ours, tokenizer


def _schedule(optimizer, name: str, warmup: int, total: int):
    """The schedule the original's main() builds (train.py, not importable): transformers' functions by name."""
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    if name == "linear":
        return get_linear_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=total)
    if name == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=total)
    return get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup)


class _Recorder:
    """Wraps an optimiser's `step`: the gradients and the learning rate each step used."""

    def __init__(self, optimizer, named_params):
        self.grads: list[dict[str, torch.Tensor]] = []
        self.lrs: list[float] = []
        inner = optimizer.step

        def step(*a, **k):
            self.grads.append({n: p.grad.clone() for n, p in named_params if p.grad is not None})
            self.lrs.append(optimizer.param_groups[0]["lr"])
            return inner(*a, **k)

        optimizer.step = step


class _NormRecorder:
    """Records the pre-clip total norm `clip_grad_norm_` returns (it returns the norm before clipping)."""

    def __init__(self, inner):
        self.inner = inner
        self.norms: list[float] = []

    def __call__(self, *a, **k):
        norm = self.inner(*a, **k)
        self.norms.append(float(norm))
        return norm


def _run_original(original, tokenizer, laion, mmc4, scheduler="constant", warmup=0, autocast=None, **args):
    wrapped = DDPLike(original)
    named = list(wrapped.named_parameters())
    optimizer = torch.optim.AdamW(original_param_groups(named, 0.1), lr=LR)
    lr_scheduler = _schedule(optimizer, scheduler, warmup, len(mmc4))
    recorder = _Recorder(optimizer, named)
    norms = _NormRecorder(torch.nn.utils.clip_grad_norm_)
    original_args = original_train_args(logging_steps=100)
    vars(original_args).update(args)
    pairs = [original_batches(a, b) for a, b in zip(laion, mmc4, strict=True)]
    with (
        mock.patch.object(torch.nn.utils, "clip_grad_norm_", norms),
        mock.patch.object(train_utils, "get_autocast", autocast or train_utils.get_autocast),
    ):
        train_utils.train_one_epoch(
            args=original_args,
            model=wrapped,
            epoch=0,
            laion_loader=_Loader(p[0] for p in pairs),
            mmc4_loader=_Loader(p[1] for p in pairs),
            tokenizer=tokenizer,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            device_id="cpu",
            wandb=None,
        )
    return {"losses": wrapped.losses, "grads": recorder.grads, "lrs": recorder.lrs, "norms": norms.norms}


def _run_ours(ours, laion, mmc4, **overrides) -> dict:
    with fresh_accelerate_state():
        args = train_args(
            learning_rate=LR,
            warmup_steps=0,
            max_steps=len(mmc4),
            run_name="unused",
            loss_multiplier_laion=MULTIPLIERS["laion"],
            loss_multiplier_mmc4=MULTIPLIERS["mmc4"],
        )
        vars(args).update(overrides)
        factory = lambda epoch: {"laion": ListLoader(laion), "mmc4": ListLoader(mmc4)}  # noqa: E731
        trainer = FlamingoTrainer(args, ours, None, factory)
        recorder = _Recorder(trainer.optimizer, list(ours.named_parameters()))
        norms = _NormRecorder(trainer.accelerator.clip_grad_norm_)
        trainer.accelerator.clip_grad_norm_ = norms
        losses, stepped = [], []
        for a, b in zip(laion, mmc4, strict=True):
            step_losses = trainer.forward_backward({"laion": a, "mmc4": b}, sync=True)
            losses += [step_losses["laion"], step_losses["mmc4"]]
            stepped.append(trainer.optimizer_step())
        mixed_precision = trainer.accelerator.mixed_precision
    return {
        "losses": losses,
        "grads": recorder.grads,
        "lrs": recorder.lrs,
        "norms": norms.norms,
        "stepped": stepped,
        "mixed_precision": mixed_precision,
        "trainer": trainer,
    }


def _assert_same_weights(ours, original, original_grads: list[dict], atol: float = 1e-6) -> None:
    """Every parameter of our language model and resampler equals the original's after the steps whose original
    gradients are `original_grads`: bit for bit where no step had a gradient (frozen weights must not move), within
    `atol` where every step's gradient was above 1e-6, and within lr / 10 per step where AdamW turned a gradient near
    its eps into a visible move (as in test_train_step). The vision tower is frozen on both sides and has no gradient
    (see the gradient comparisons)."""
    model_type = ours.config.text_config.model_type
    layers_attr = ours.config.decoder_layers_attr_name
    theirs = {canonical_name(n, layers_attr): p for n, p in original.named_parameters()}
    grads = [{canonical_name(n, layers_attr): g for n, g in step.items()} for step in original_grads]
    for name, p in ours.named_parameters():
        if name.endswith(".flamingo_token_rows") or name.startswith("vision_encoder."):
            continue  # the rows are copied into the embedding weight, compared there
        key = original_name(name, model_type)
        other = theirs[key]
        msg = lambda m, n=name: f"{n}: {m}"  # noqa: E731
        if not any(key in step for step in grads):
            torch.testing.assert_close(p, other, atol=0, rtol=0, msg=msg)
            continue
        stable = torch.stack([step[key].abs() > 1e-6 for step in grads]).all(0)
        torch.testing.assert_close(p[stable], other[stable], atol=atol, rtol=0, msg=msg)
        torch.testing.assert_close(p[~stable], other[~stable], atol=LR / 10 * len(grads), rtol=0, msg=msg)


def _assert_same_grads(ours_model, ours_grads, original_grads) -> None:
    layers_attr = ours_model.config.decoder_layers_attr_name
    mapped = grads_as_original(ours_model, ours_grads)
    theirs = {canonical_name(n, layers_attr): g for n, g in original_grads.items()}
    assert set(mapped) == set(theirs)
    for name, grad in mapped.items():
        torch.testing.assert_close(grad, theirs[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_freeze_lm_embeddings_matches_the_original():
    original, ours, tokenizer = _models(freeze_lm_embeddings=True)
    laion, mmc4 = _batches(tokenizer, 1)
    embedding = ours.get_input_embeddings().weight.detach().clone()
    theirs = _run_original(original, tokenizer, laion, mmc4, freeze_lm_embeddings=True)
    mine = _run_ours(ours, laion, mmc4, freeze_lm_embeddings=True)
    assert mine["losses"] == pytest.approx(theirs["losses"], abs=1e-5)
    # No embedding gradient on either side (the tied head included): the same trainable set.
    _assert_same_grads(ours, mine["grads"][0], theirs["grads"][0])
    assert not any("embed" in n or "wte" in n for n in theirs["grads"][0])
    assert mine["trainer"].token_rows is None and mine["trainer"].embedding_mask is None
    assert torch.equal(ours.get_input_embeddings().weight, embedding)
    _assert_same_weights(ours, original, theirs["grads"])


def test_gradient_clipping_is_active_and_matches_the_original():
    original, ours, tokenizer = _models()
    laion, mmc4 = _batches(tokenizer, 1)
    # Loss multipliers (the same on both sides) large enough that the pre-clip norm is well above 1.
    multipliers = {"loss_multiplier_laion": 20.0, "loss_multiplier_mmc4": 100.0}
    theirs = _run_original(original, tokenizer, laion, mmc4, **multipliers)
    mine = _run_ours(ours, laion, mmc4, max_grad_norm=1.0, **multipliers)
    assert mine["norms"] == pytest.approx(theirs["norms"], rel=1e-4)
    assert mine["norms"][0] > 5.0  # the original clips at 1.0: this step is clipped
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in mine["grads"][0].values()]))
    assert float(norm) == pytest.approx(1.0, rel=1e-4)
    _assert_same_grads(ours, mine["grads"][0], theirs["grads"][0])
    _assert_same_weights(ours, original, theirs["grads"])


@pytest.mark.parametrize("scheduler", ["linear", "cosine"])
def test_lr_schedule_matches_the_original(scheduler):
    steps, warmup = 4, 1
    original, ours, tokenizer = _models()
    laion, mmc4 = _batches(tokenizer, steps)
    theirs = _run_original(original, tokenizer, laion, mmc4, scheduler=scheduler, warmup=warmup)
    mine = _run_ours(ours, laion, mmc4, lr_scheduler=scheduler, warmup_steps=warmup)
    assert mine["stepped"] == [True] * steps
    assert mine["lrs"] == pytest.approx(theirs["lrs"], rel=1e-12)
    # Warmup from 0 to the full rate, then a decay (2/3 and 1/3 of it for linear, 3/4 and 1/4 for cosine).
    assert mine["lrs"][:2] == [0.0, pytest.approx(LR)]
    assert 0 < mine["lrs"][3] < mine["lrs"][2] < LR
    _assert_same_weights(ours, original, theirs["grads"], atol=1e-5)


def _cpu_bf16_autocast(precision, cache_enabled=True):
    """`train_utils.get_autocast` on the CPU: the bf16 autocast the original builds with `torch.cuda.amp.autocast`."""
    assert precision == "amp_bf16"
    return lambda: torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=cache_enabled)


def _nan_mmc4(batch: dict) -> dict:
    # Finite pixels that overflow inside the vision tower: the MMC4 loss is NaN (the original skips only NaN).
    return dict(batch, pixel_values=torch.full_like(batch["pixel_values"], 1e38))


def test_amp_bf16_step_and_nonfinite_skip_match_the_original():
    original, ours, tokenizer = _models()
    laion, mmc4 = _batches(tokenizer, 3)
    mmc4[1] = _nan_mmc4(mmc4[1])
    fp32_loss = float(ours(**laion[0], use_cache=False).loss)
    theirs = _run_original(original, tokenizer, laion, mmc4, autocast=_cpu_bf16_autocast, precision="amp_bf16")
    mine = _run_ours(ours, laion, mmc4, precision="amp_bf16")
    assert mine["mixed_precision"] == "bf16"
    # Autocast was on: the loss is not the fp32 one, and it matches the original's under the same autocast.
    assert mine["losses"][0] != fp32_loss
    assert mine["losses"][0] == pytest.approx(fp32_loss, abs=5e-2)
    # The second MMC4 loss is NaN: both loops skip that step (the original drops the LAION gradient with it).
    assert mine["stepped"] == [True, False, True]
    assert torch.isnan(torch.tensor(theirs["losses"][3])) and torch.isnan(torch.tensor(mine["losses"][3]))
    assert len(mine["grads"]) == len(theirs["grads"]) == 2
    finite = [i for i in range(6) if i != 3]
    assert [mine["losses"][i] for i in finite] == pytest.approx([theirs["losses"][i] for i in finite], abs=2e-2)
    # bf16 rounding differs between the two implementations: each step's gradient agrees to 5% per tensor, above a
    # noise floor of 2e-3 (some cross-attention gradients are ~1e-4, below bf16's resolution of the activations).
    layers_attr = ours.config.decoder_layers_attr_name
    for step, (ours_grads, original_grads) in enumerate(zip(mine["grads"], theirs["grads"], strict=True)):
        mapped = grads_as_original(ours, ours_grads)
        other = {canonical_name(n, layers_attr): g for n, g in original_grads.items()}
        assert set(mapped) == set(other)
        for name, grad in mapped.items():
            error, scale = float((grad - other[name]).norm()), float(other[name].norm())
            assert error <= 0.05 * scale + 2e-3, (step, name, error, scale)
    assert mine["trainer"].state.skipped_steps == 1


def test_lora_flags_put_adapters_on_exactly_the_named_modules_with_that_dropout():
    """`--lora_target_modules out_proj up_proj --lora_dropout 0.25` as the command line parses them: adapters on the
    language model's decoder-layer `out_proj` and `up_proj` only (not the vision tower's `out_proj`, not the default
    `Wqkv`, nothing in the cross-attention), each with dropout 0.25."""
    from modeling_flamingo.training.arguments import TrainingArguments
    from modeling_flamingo.training.cli import build_parser

    flags = ["--model", "unused", "--laion_shards", "unused", "--lora_r", "2", "--lora_dropout", "0.25"]
    args = TrainingArguments.from_groups(
        *build_parser().parse([*flags, "--lora_target_modules", "out_proj", "up_proj"])
    )
    args = dataclasses.replace(args, report_to=[], run_name="unused", max_steps=1, warmup_steps=0)
    model, tokenizer = tiny_model(family=FAMILY)
    candidates = {n for n, _ in model.named_modules() if n.endswith(("out_proj", "up_proj", "Wqkv"))}
    laion, mmc4 = _batches(tokenizer, 1)
    with fresh_accelerate_state():
        FlamingoTrainer(args, model, None, lambda epoch: {"laion": ListLoader(laion), "mmc4": ListLoader(mmc4)})
    adapted = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    expected = {n for n in candidates if ".decoder_layer." in n and n.endswith(("out_proj", "up_proj"))}
    assert len(expected) == 2 * model.config.text_config.n_layers
    assert set(adapted) == expected
    for name, module in adapted.items():
        dropout = module.lora_dropout["default"]
        assert isinstance(dropout, torch.nn.Dropout) and dropout.p == 0.25, name
        assert module.r["default"] == 2, name


def test_tokenizer_path_is_the_tokenizer_a_fresh_model_trains_with(tmp_path):
    """`--init_from` with `--tokenizer_path` naming a tokenizer other than the one in `--lm_path` (one more token):
    the run trains and exports with that tokenizer, its embeddings sized for it."""
    from train_data_helpers import make_laion_shards

    from modeling_flamingo import FlamingoForConditionalGeneration, FlamingoProcessor
    from modeling_flamingo.demo import write_release_inputs
    from modeling_flamingo.testing import make_tiny_tokenizer
    from modeling_flamingo.training.cli import main

    model, tokenizer = tiny_model()  # MosaicGPT: the parts layout the demo writes (tests/test_train_cli.py)
    parts = write_release_inputs(model, tokenizer, make_tiny_tokenizer(), tmp_path)
    other = make_tiny_tokenizer()
    other.add_tokens(["<zebra>"])
    other.save_pretrained(tmp_path / "other_tokenizer")
    assert "<zebra>" not in AutoTokenizer.from_pretrained(parts["language_model"]).get_vocab()
    laion = make_laion_shards(tmp_path / "laion", num_shards=1, samples_per_shard=2)
    flags = ["--batch_size_laion", "2", "--train_num_samples_laion", "2", "--workers", "0", "--max_steps", "1"]
    with fresh_accelerate_state(), mock.patch.dict("os.environ", ACCELERATE_USE_CPU="true", HF_HUB_OFFLINE="1"):
        status = main([
            "--init_from", "--vision_encoder_path", str(parts["clip"]), "--lm_path", str(parts["language_model"]),
            "--tokenizer_path", str(tmp_path / "other_tokenizer"), "--laion_shards", laion,
            "--run_name", str(tmp_path / "run"), "--warmup_steps", "0", *flags,
        ])  # fmt: skip
    assert status == 0
    exported = FlamingoProcessor.from_pretrained(tmp_path / "run" / "model").tokenizer
    assert "<zebra>" in exported.get_vocab()
    vocab = exported.get_vocab()
    assert {token: vocab[token] for token in other.get_vocab()} == other.get_vocab()  # plus the Flamingo tokens
    trained = FlamingoForConditionalGeneration.from_pretrained(tmp_path / "run" / "model")
    assert trained.get_input_embeddings().weight.shape[0] >= len(exported)


def test_mmc4_image_order_and_no_flip_reach_the_batches_the_cli_builds(tmp_path):
    """`--mmc4_image_order text` and `--no_flip` as `parse_args` reads them, through the loaders `main` builds
    (`data_loader_factory`): on documents whose second image matches the first sentence, `text` swaps the two images
    of `document` order; without `--no_flip` some documents come flipped (seeded), with it none."""
    from train_data_helpers import image_bytes, mmc4_document, sentence, write_mmc4_shard

    from modeling_flamingo.training.cli import data_loader_factory, parse_args

    sentences = [sentence(index, 5) for index in range(3)]
    # Image A matches sentence 1, image B sentence 0 (as in test_train_data's image-order test).
    document = mmc4_document(sentences, [image_bytes(11), image_bytes(12)], [[0.1, 0.5, 0.1], [0.6, 0.1, 0.1]])
    shard = write_mmc4_shard(tmp_path / "mmc4.tar", [document] * 6)
    _, tokenizer = tiny_model()
    processor = tiny_processor(tokenizer)
    flags = ["--model", "unused", "--mmc4_shards", str(shard), "--batch_size_mmc4", "1"]
    flags += ["--train_num_samples_mmc4", "6", "--workers", "0", "--mmc4_max_num_images", "2"]

    def images(*extra: str) -> list[torch.Tensor]:
        args = parse_args([*flags, *extra])
        loaders = data_loader_factory(args, processor, 0, 1)(0)
        return [batch["pixel_values"][0, :2, 0] for batch in loaders["mmc4"].dataloader]  # (2, 3, H, W) each

    document_order = images("--no_flip")
    text_order = images("--no_flip", "--mmc4_image_order", "text")
    flipped = images()
    assert len(document_order) == len(text_order) == len(flipped) == 6
    a, b = document_order[0]
    assert not torch.equal(a, b) and all(torch.equal(x, document_order[0]) for x in document_order)
    assert all(torch.equal(x, torch.stack([b, a])) for x in text_order)
    kinds = ["flipped" if torch.equal(x, document_order[0].flip(-1)) else "same" for x in flipped]
    assert {"flipped", "same"} == set(kinds), kinds
    assert all(torch.equal(x, document_order[0]) for x, kind in zip(flipped, kinds, strict=True) if kind == "same")
