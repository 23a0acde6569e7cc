"""Parity of the evaluation harness with the ORIGINAL one (`open_flamingo.eval.evaluate`) on the same tiny weights.

The original's own `evaluate_captioning` / `evaluate_vqa` / `evaluate_classification` run the original model (through
`reference_eval.OriginalEvalModel`); ours runs through the CLI on the converted folder of the same weights. Both
record every model call: for the same seed they must see the same prompts and the same images in the same batches,
produce the same predictions (captioning, VQA) or class log-likelihoods (1e-4, classification), and report the same
score.
"""

from __future__ import annotations

import json

import pytest
import torch
from eval_data import (
    FAMILY,
    make_coco,
    make_flickr,
    make_hateful_memes,
    make_imagenet,
    make_vqa,
    set_vqa_test_answers,
    tiny_model_folder,
)
from eval_recording import COMMON, SEED, Recorder, run_ours
from reference_eval import (
    OriginalEvalModel,
    init_single_process_group,
    load_original_evaluate,
    original_args,
    with_imagenet_ocr_fix,
)

from modeling_flamingo.evaluation import tasks as our_tasks
from modeling_flamingo.evaluation.classnames import IMAGENET_CLASSNAMES
from modeling_flamingo.testing import FAMILIES

# The full matrix runs on FAMILY (llama); each other family of the released models (MosaicGPT, GPT-NeoX, MPT) runs
# one 4-shot case per task, where its attention, cache and padding paths are exercised.
OTHER_FAMILIES = [family for family in FAMILIES if family != FAMILY]


@pytest.fixture(scope="module")
def setup(request, tmp_path_factory):
    """(root, converted folder, original eval model) of one LM family (`FAMILY` unless parametrized indirectly)."""
    family = getattr(request, "param", FAMILY)
    root = tmp_path_factory.mktemp(f"parity-{family}")
    folder, original, tokenizer = tiny_model_folder(root, family)
    init_single_process_group(root)
    return root, folder, OriginalEvalModel(original, tokenizer, image_size=42)


@pytest.mark.parametrize(
    "setup,name,shots",
    [(FAMILY, "coco", 0), (FAMILY, "coco", 4), (FAMILY, "flickr30", 4)] + [(f, "coco", 4) for f in OTHER_FAMILIES],
    indirect=["setup"],
)
def test_captioning_matches_original(setup, name, shots, monkeypatch):
    root, folder, original_model = setup
    paths = make_coco(root / "data") if name == "coco" else make_flickr(root / "data")
    evaluate = load_original_evaluate()
    theirs = Recorder()
    monkeypatch.setattr(original_model, "get_outputs", theirs.original_generation(original_model))
    monkeypatch.chdir(root)  # the original writes its temporary result files to the working directory
    expected_score = evaluate.evaluate_captioning(
        original_args(**paths, **COMMON),
        original_model,
        seed=SEED,
        num_shots=shots,
        dataset_name="coco" if name == "coco" else "flickr",
    )
    ours, score, results_file = run_ours(root, folder, f"eval_{name}", paths, shots, monkeypatch, "generate")

    assert len(theirs.calls) == 3  # 5 items in batches of 2
    assert [c[:2] for c in ours.calls] == [c[:2] for c in theirs.calls]  # prompts and image files, batch by batch
    assert [c[2] for c in ours.calls] == [c[2] for c in theirs.calls]  # raw generations
    assert any(out for call in theirs.calls for out in call[2])  # something was generated
    assert score == pytest.approx(expected_score, abs=1e-9)
    records = [
        json.loads(line) for line in (results_file.with_suffix("") / "predictions").glob("*.jsonl").__next__().open()
    ]
    assert [r["prompt"] for r in records] == [t for call in theirs.calls for t in call[0]]


@pytest.mark.parametrize(
    "setup,name,shots",
    [(FAMILY, "vqav2", 0), (FAMILY, "vqav2", 4), (FAMILY, "vizwiz", 4), (FAMILY, "textvqa", 4)]
    + [(f, "vqav2", 4) for f in OTHER_FAMILIES],
    indirect=["setup"],
)
def test_vqa_matches_original(setup, name, shots, monkeypatch):
    root, folder, original_model = setup
    paths = make_vqa(root / "data", name)
    # Random human answers rarely match a tiny model's: every other test question gets the model's own first-pass
    # answer as its ten references, so a score of 0 against 0 cannot pass and half the items score 100.
    first_pass = _predictions(run_ours(root, folder, f"eval_{name}", paths, shots, monkeypatch, "generate")[2])
    assert all(answer.strip() for answer in first_pass.values())  # the model answers every question
    set_vqa_test_answers(paths, name, {qid: answer for qid, answer in sorted(first_pass.items())[::2]})
    evaluate = load_original_evaluate()
    theirs = Recorder()
    monkeypatch.setattr(original_model, "get_outputs", theirs.original_generation(original_model))
    monkeypatch.chdir(root)
    # The original's main() passes max_generation_length=10 for TextVQA (5, the default, elsewhere).
    length = {"max_generation_length": 10} if name == "textvqa" else {}
    expected_score = evaluate.evaluate_vqa(
        original_args(**paths, **COMMON), original_model, seed=SEED, num_shots=shots, dataset_name=name, **length
    )
    ours, score, _ = run_ours(root, folder, f"eval_{name}", paths, shots, monkeypatch, "generate")
    assert [c[:2] for c in ours.calls] == [c[:2] for c in theirs.calls]
    assert [c[2] for c in ours.calls] == [c[2] for c in theirs.calls]
    assert score == pytest.approx(expected_score, abs=1e-9)
    assert 0 < score < 100


def _predictions(results_file) -> dict:
    """{item id: post-processed prediction} of the run's one predictions file."""
    (path,) = (results_file.with_suffix("") / "predictions").glob("*.jsonl")
    return {r["id"]: r["prediction"] for r in map(json.loads, path.open())}


def _compare_rankings(ours: Recorder, theirs: Recorder):
    assert len(ours.calls) == len(theirs.calls) > 0
    for (our_text, our_images, our_scores), (text, images, scores) in zip(ours.calls, theirs.calls, strict=True):
        assert our_text == text and our_images == images
        torch.testing.assert_close(our_scores, scores.float(), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "setup,shots,caching",
    [(FAMILY, shots, caching) for caching in (True, False) for shots in (0, 4)]
    + [(f, 4, caching) for f in OTHER_FAMILIES for caching in (True, False)],
    indirect=["setup"],
)
def test_hateful_memes_matches_original(setup, shots, caching, monkeypatch):
    root, folder, original_model = setup
    paths = make_hateful_memes(root / "data")
    evaluate = load_original_evaluate()
    theirs = Recorder()
    monkeypatch.setattr(original_model, "get_rank_classifications", theirs.original_ranking(original_model))
    # With its cached context the original feeds class tokens without an attention mask, so in a left-padded batch
    # they attend to the padding: compare that path on batches of one, where there is none.
    common = dict(COMMON, batch_size=2 if not caching else 1)
    args = original_args(**paths, **common)
    expected_auc = evaluate.evaluate_classification(
        args, original_model, seed=SEED, num_shots=shots, dataset_name="hateful_memes", no_kv_caching=not caching
    )
    extra = [f"--batch_size={common['batch_size']}"] + ([] if caching else ["--no_caching_for_classification"])
    ours, auc, _ = run_ours(
        root, folder, "eval_hateful_memes", paths, shots, monkeypatch, "rank_classifications", extra
    )
    _compare_rankings(ours, theirs)
    assert auc == pytest.approx(expected_auc, abs=1e-6)


def test_imagenet_matches_original(setup, monkeypatch):
    """Four shots, random demonstrations. On the CPU the candidate list is cut to the first 20 names in BOTH harnesses
        (the full list is compared with the original's in another test); the 3 class folders are its first 3 names. The
    original needs `with_imagenet_ocr_fix` to run ImageNet at all (see reference_eval)."""
    root, folder, original_model = setup
    paths = make_imagenet(root / "data")
    evaluate = load_original_evaluate()
    names = list(IMAGENET_CLASSNAMES[:20])
    monkeypatch.setattr(evaluate, "IMAGENET_CLASSNAMES", names)
    with_imagenet_ocr_fix(evaluate, monkeypatch)
    monkeypatch.setitem(our_tasks.TASKS, "imagenet", _with_class_names(our_tasks.TASKS["imagenet"], names))
    theirs = Recorder()
    monkeypatch.setattr(original_model, "get_rank_classifications", theirs.original_ranking(original_model))
    common = dict(COMMON, batch_size=1, num_samples=3)
    expected = evaluate.evaluate_classification(
        original_args(**paths, **common), original_model, seed=SEED, num_shots=4, dataset_name="imagenet"
    )
    extra = ["--batch_size=1", "--num_samples=3"]
    ours, accuracy, _ = run_ours(root, folder, "eval_imagenet", paths, 4, monkeypatch, "rank_classifications", extra)
    _compare_rankings(ours, theirs)
    assert accuracy == pytest.approx(expected, abs=1e-12)


def test_imagenet_class_names_are_the_originals():
    from open_flamingo.eval.classification_utils import HM_CLASSNAMES
    from open_flamingo.eval.classification_utils import IMAGENET_CLASSNAMES as ORIGINAL

    assert list(IMAGENET_CLASSNAMES) == list(ORIGINAL) and len(ORIGINAL) == 1000
    assert list(our_tasks.TASKS["hateful_memes"].class_names) == list(HM_CLASSNAMES)


def _with_class_names(spec, names):
    import dataclasses

    return dataclasses.replace(spec, class_names=tuple(names))
