"""The ORIGINAL evaluation harness (`open_flamingo.eval.evaluate`) driven on a tiny original model.

`OriginalEvalModel` plays the part of the repository's `open_flamingo/eval/models/open_flamingo.py` (which the pip
package does not ship) for a model built by `reference.build_original`: the same prompts, left padding, beam-search
arguments and class ranking, including the cached-context path that feeds class-name tokens one at a time without an
attention mask. `load_original_evaluate` imports `evaluate.py` the way its script expects (its folder on `sys.path`)
and replaces only what cannot run offline: `compute_cider` runs every COCOEvalCap scorer, and SPICE downloads
Stanford CoreNLP at first use, so the stand-in runs the same PTB tokenizer and CIDEr scorer on the same files and
reports CIDEr alone (the only number the harness uses). `with_imagenet_ocr_fix` works around a bug of the original:
its `evaluate_classification` builds every query prompt with `batch["ocr"]`, which ImageNet items lack (KeyError at
evaluate.py:1233, also at the repository's HEAD); the stand-in dataset adds `"ocr": None`, which the ImageNet prompt
ignores.
"""

from __future__ import annotations

import copy
import importlib
import os
import sys
from pathlib import Path

import open_clip
import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

EVAL_DIR = Path(importlib.util.find_spec("open_flamingo").origin).parent / "eval"


def load_original_evaluate():
    """Import the original `evaluate.py` as its script does, with CIDEr-only `compute_cider` (see module doc)."""
    if str(EVAL_DIR) not in sys.path:
        sys.path.insert(0, str(EVAL_DIR))
    import evaluate  # noqa: E402  (the original's module, found through sys.path)

    evaluate.compute_cider = _cider_only
    return evaluate


def with_imagenet_ocr_fix(evaluate, monkeypatch) -> None:
    """Give the original's ImageNet items the `ocr` field its classification loop reads (see module doc)."""

    class ImageNetWithOcr(evaluate.ImageNetDataset):
        def __getitem__(self, idx):
            return {**super().__getitem__(idx), "ocr": None}

    monkeypatch.setattr(evaluate, "ImageNetDataset", ImageNetWithOcr)


def _cider_only(result_path: str, annotations_path: str) -> dict:
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    from pycocotools.coco import COCO

    coco = COCO(annotations_path)
    result = coco.loadRes(result_path)
    ids = result.getImgIds()
    gts = {i: coco.imgToAnns[i] for i in ids}
    res = {i: result.imgToAnns[i] for i in ids}
    tokenizer = PTBTokenizer()
    score, _ = Cider().compute_score(tokenizer.tokenize(gts), tokenizer.tokenize(res))
    return {"CIDEr": score}


def init_single_process_group(tmp_path: Path) -> None:
    """The original harness calls DistributedSampler and all_gather_object: a world of one (gloo, CPU)."""
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{tmp_path / 'dist_init'}", rank=0, world_size=1
        )


class OriginalEvalModel:
    """Evaluation wrapper of the original model, as the original repository's EvalModel (one device).

    `dtype` other than float32 casts the weights (`model.to(dtype)`, in place) and the images to it; token ids stay
    integers. That is not what the original's own `--precision bf16` / `fp16` does: its EvalModel (655f693) keeps
    fp32 weights and casts the images and the token ids, which fails at the first forward
    (tests/test_eval_precision.py); its `amp_bf16` is CUDA autocast on fp32 weights.

    `device` (cpu by default): where the model must already be; the inputs are moved there.
    """

    def __init__(self, model, tokenizer, image_size: int, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        self.model = model.eval().to(dtype)
        self.dtype = dtype
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        self.image_processor = open_clip.image_transform(image_size, is_train=False)
        self.device = device
        self.lm_name = "tiny"

    # prompts -------------------------------------------------------------------------------------------------
    @staticmethod
    def _slot(answer) -> str:
        return "" if answer is None else f"{answer}<|endofchunk|>"

    def get_vqa_prompt(self, question, answer=None) -> str:
        return f"<image>Question:{question} Short answer:{self._slot(answer)}"

    def get_caption_prompt(self, caption=None) -> str:
        return f"<image>Output:{self._slot(caption)}"

    def get_imagenet_prompt(self, label=None) -> str:
        return f"<image>Output:{self._slot(label)}"

    def get_hateful_memes_prompt(self, text, label=None) -> str:
        return f"<image>is an image with: '{text}' written on it. Is it hateful? Answer:{self._slot(label)}"

    # inputs --------------------------------------------------------------------------------------------------
    def _prepare_images(self, batch) -> torch.Tensor | None:
        """(B, T_img, 1, C, H, W), zeros for samples with fewer images; None without images."""
        most = max(len(images) for images in batch)
        out = None
        for b, images in enumerate(batch):
            for t, image in enumerate(images):
                pixels = self.image_processor(image)
                if out is None:
                    out = torch.zeros((len(batch), most, 1) + pixels.shape, dtype=pixels.dtype)
                out[b, t, 0] = pixels
        return None if out is None else out.to(self.device, self.dtype)

    def _prepare_text(self, batch):
        enc = self.tokenizer(batch, padding="longest", truncation=True, return_tensors="pt", max_length=2000)
        return enc["input_ids"].to(self.device), enc["attention_mask"].bool().to(self.device)

    # the two calls of the harness ----------------------------------------------------------------------------
    def get_outputs(
        self, batch_text, batch_images, min_generation_length, max_generation_length, num_beams, length_penalty
    ):
        vision_x = self._prepare_images(batch_images)
        input_ids, attention_mask = self._prepare_text(batch_text)
        with torch.inference_mode():
            out = self.model.generate(
                vision_x,
                input_ids,
                attention_mask,
                min_new_tokens=min_generation_length,
                max_new_tokens=max_generation_length,
                num_beams=num_beams,
                length_penalty=length_penalty,
            )
        return self.tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)

    def get_rank_classifications(self, batch_text, batch_images, all_class_names, use_cache, normalize_length):
        vision_x = self._prepare_images(batch_images)
        ctx_ids, ctx_mask = self._prepare_text(batch_text)
        if use_cache:
            self.model.cache_media(input_ids=ctx_ids, vision_x=vision_x)
            ctx = self._forward(ctx_ids, None, ctx_mask, clear=False, use_cache=True)
            ctx_logits, past = ctx.logits, ctx.past_key_values
        else:
            past = None
        scores = []
        for name in all_class_names:
            tokens = self.tokenizer(name, add_special_tokens=False, return_tensors="pt")["input_ids"].to(self.device)
            tokens = tokens.repeat(len(batch_text), 1)
            n = tokens.shape[1]
            if use_cache:
                # The original was written for transformers 4's immutable tuple caches; a DynamicCache grows in
                # place, so each class name continues from its own copy of the context's cache.
                out = self._forward(tokens, None, None, clear=False, past_key_values=copy.deepcopy(past))
                logits = torch.cat([ctx_logits, out.logits], dim=1)
            else:
                ids = torch.cat([ctx_ids, tokens], dim=1)
                mask = torch.cat([ctx_mask, torch.ones_like(tokens).bool()], dim=1)
                logits = self._forward(ids, vision_x, mask, clear=True).logits
            logprobs = torch.log_softmax(logits, dim=-1)[:, -n - 1 : -1]
            per_token = torch.gather(logprobs, 2, tokens[:, :, None]).squeeze(-1)
            scores.append(per_token.mean(1) if normalize_length else per_token.sum(1))
        self.model.uncache_media()
        return torch.vstack(scores).T.cpu()

    def _forward(self, lang_x, vision_x, attention_mask, clear, use_cache=False, past_key_values=None):
        """One forward; with `past_key_values`, the tokens one at a time (no attention mask), as the original."""
        with torch.inference_mode():
            if past_key_values is None:
                return self.model(
                    vision_x=vision_x,
                    lang_x=lang_x,
                    attention_mask=attention_mask,
                    clear_conditioned_layers=clear,
                    use_cache=use_cache,
                )
            logits = []
            for t in range(lang_x.shape[1]):
                out = self.model(
                    vision_x=vision_x,
                    lang_x=lang_x[:, t : t + 1],
                    attention_mask=None,
                    clear_conditioned_layers=False,
                    past_key_values=past_key_values,
                    use_cache=True,
                )
                past_key_values = out.past_key_values
                logits.append(out.logits)
        return CausalLMOutputWithPast(logits=torch.cat(logits, dim=1), past_key_values=past_key_values)


def original_args(**overrides):
    """An argparse namespace with the original evaluate.py's defaults (parsed from no arguments)."""
    evaluate = load_original_evaluate()
    args, _ = evaluate.parser.parse_known_args([])
    args.model = "open_flamingo"
    args.rank, args.world_size = 0, 1
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
