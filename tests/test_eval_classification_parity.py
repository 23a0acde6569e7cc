"""Classification as users run it, compared per item and class with itself and with the ORIGINAL harness.

`test_eval_parity.py` compares the cached path with the original's at batch 1 and a 20-name ImageNet list. Here the
CLI runs the default batch of 8 (left-padded prompts of different lengths), with cached and uncached context, class
names split into several chunks (`--class_batch_size`) or in one, on Hateful Memes; every class log-likelihood of
every item must agree (1e-4) across these runs and with the original's own `evaluate_classification` on its
uncached path at batch 8 (its cached path attends to the left padding, see docs/evaluation.md). With prompt ensembling, the averaged log-likelihoods our predictions files report are compared
with those the original ranks its classes by.
"""

from __future__ import annotations

import pytest
import torch
from eval_data import make_hateful_memes, tiny_model_folder, write_image
from eval_recording import SEED, Recorder, classification_rows, run_classification
from reference_eval import (
    OriginalEvalModel,
    init_single_process_group,
    load_original_evaluate,
    original_args,
)

from modeling_flamingo.evaluation.datasets import EvalItem
from modeling_flamingo.evaluation.eval_model import FlamingoEvalModel

BATCH = 8  # the CLI's default --batch_size
TOL = dict(atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("classification-parity")
    folder, original, tokenizer = tiny_model_folder(root)
    init_single_process_group(root)
    return root, folder, OriginalEvalModel(original, tokenizer, image_size=42)


@pytest.mark.parametrize(
    "name,shots,num_samples,chunked",
    [
        ("hateful_memes", 2, 8, 8),  # 8 rows per pass at batch 8: one class name per chunk
    ],
)
def test_batch_cache_and_chunks_match_each_other_and_original(
    setup, tmp_path, name, shots, num_samples, chunked, monkeypatch
):
    root, folder, original_model = setup
    paths = make_hateful_memes(tmp_path / "data")
    class_names = ["no", "yes"]
    common = ["--num_samples", str(num_samples), "--query_set_size", "6"]

    runs = {
        "cached, batch 8, chunked": [f"--batch_size={BATCH}", f"--class_batch_size={chunked}"],
        "uncached, batch 8": [f"--batch_size={BATCH}", "--no_caching_for_classification"],
        "cached, batch 1, unchunked": ["--batch_size=1", f"--class_batch_size={len(class_names)}"],
    }
    ours = {
        run: run_classification(
            tmp_path, folder, name, paths, shots, monkeypatch, run.replace(", ", "-"), common + extra
        )
        for run, extra in runs.items()
    }

    evaluate = load_original_evaluate()
    theirs = Recorder()
    monkeypatch.setattr(original_model, "get_rank_classifications", theirs.original_ranking(original_model))
    args = original_args(**paths, num_samples=num_samples, query_set_size=6, batch_size=BATCH)
    evaluate.evaluate_classification(
        args, original_model, seed=SEED, num_shots=shots, dataset_name=name, no_kv_caching=True
    )
    prompts, expected = classification_rows(theirs)

    assert expected.shape == (num_samples, len(class_names))
    assert [len(call[0]) for call in theirs.calls] == [BATCH]
    # The batch is left-padded: the prompts' token lengths differ, so a cache that ignored padding would show.
    lengths = {len(original_model.tokenizer(text)["input_ids"]) for text, _ in prompts}
    assert len(lengths) > 1
    for run, (our_prompts, scores, records) in ours.items():
        assert our_prompts == prompts, run
        torch.testing.assert_close(scores, expected, **TOL, msg=lambda m, run=run: f"{run}: {m}")
        # The predictions file reports the same best classes and log-likelihoods.
        for record, row in zip(records, expected, strict=True):
            top = torch.topk(row, k=min(5, len(class_names)))
            assert [c for c, _ in record["top_classes"]] == [class_names[i] for i in top.indices], run
            torch.testing.assert_close(torch.tensor([v for _, v in record["top_classes"]]), top.values, **TOL)


def test_prompt_ensembling_scores_match_original(setup, tmp_path, monkeypatch):
    """Hateful Memes at 4 shots: 6 orderings of each item's demonstrations, whose class log-likelihoods are averaged.
    Both harnesses must rank the same prompts with the same scores, and our predictions file (`top_classes`, both
    classes) must hold the original's averaged log-likelihoods, item by item."""
    root, folder, original_model = setup
    paths = make_hateful_memes(tmp_path / "data")
    evaluate = load_original_evaluate()
    theirs = Recorder()
    monkeypatch.setattr(original_model, "get_rank_classifications", theirs.original_ranking(original_model))
    averaged = []
    get_predicted = evaluate.utils.get_predicted_classnames

    def recording(logprobs, *args, **kwargs):
        averaged.append(logprobs.clone())
        return get_predicted(logprobs, *args, **kwargs)

    monkeypatch.setattr(evaluate.utils, "get_predicted_classnames", recording)
    args = original_args(**paths, num_samples=8, query_set_size=6, batch_size=4)
    evaluate.evaluate_classification(
        args,
        original_model,
        seed=SEED,
        num_shots=4,
        dataset_name="hateful_memes",
        no_kv_caching=True,
        use_prompt_ensembling=True,
    )
    extra = ["--num_samples=8", "--query_set_size=6", "--batch_size=4", "--no_caching_for_classification"]
    extra.append("--classification_prompt_ensembling")
    our_prompts, scores, records = run_classification(
        tmp_path, folder, "hateful_memes", paths, 4, monkeypatch, "ours", extra
    )

    prompts, expected_per_prompt = classification_rows(theirs)
    assert len(theirs.calls) == 2 * 6  # two batches of 4, six orderings each
    assert our_prompts == prompts
    torch.testing.assert_close(scores, expected_per_prompt, **TOL)
    expected = torch.cat(averaged).float()  # (8, 2): the mean over orderings the original ranks by
    # Calls run batch by batch, ordering by ordering: (batch, ordering, item, class) -> (item, ordering, class).
    per_ordering = expected_per_prompt.view(2, 6, 4, 2).transpose(1, 2).reshape(8, 6, 2)
    torch.testing.assert_close(per_ordering.mean(1), expected, **TOL)
    assert (per_ordering.std(1) > 1e-3).all()  # the orderings score differently: the average is not any one of them
    ours = torch.tensor([[dict(r["top_classes"])[c] for c in ("no", "yes")] for r in records])
    torch.testing.assert_close(ours, expected, **TOL)


def test_cached_ranking_of_names_of_every_length(setup, tmp_path):
    """The cached ranking feeds each name's first L - 1 tokens (names of one token need no forward), groups names by
    length (`class_batch_size // B` per forward, the last group's remainder in a smaller one) and reuses the
    repeated context across forwards. Its log-likelihoods (mean and sum) must equal our uncached path's and the
    original's uncached `get_rank_classifications` (1e-4) on a left-padded batch of 3 with 1 or 2 images per
    prompt, for any chunk size; and the forwards are the context's plus one per chunk of multi-token names."""
    _, folder, original_model = setup
    eval_model = FlamingoEvalModel.from_pretrained(str(folder))
    tokenizer = eval_model.tokenizer
    names = ["a", "b", "at", "ox", "tench", "goldfish", "great white shark", "cat", "electric ray", "ram"]
    lengths = [len(tokenizer(name, add_special_tokens=False)["input_ids"]) for name in names]
    assert lengths.count(1) >= 2 and len(set(lengths)) >= 4  # names of one token, and several other lengths
    items = []
    for i in range(4):
        write_image(tmp_path / f"{i}.jpg", seed=100 + i)
        items.append(EvalItem(id=i, image_path=str(tmp_path / f"{i}.jpg")))
    texts = [
        "<image>Output:tench<|endofchunk|><image>Output:",
        "<image>Output:",
        "<image>Output:great white shark<|endofchunk|><image>Output:",
    ]
    batch_images = [[items[0], items[1]], [items[2]], [items[3], items[0]]]
    pil_images = [[item.load_image() for item in images] for images in batch_images]
    assert len({len(tokenizer(text)["input_ids"]) for text in texts}) == 3  # left padding in the batch

    forwards = []
    hook = eval_model.model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    for normalize in (True, False):
        expected = original_model.get_rank_classifications(texts, pil_images, names, False, normalize).float()
        uncached = eval_model.rank_classifications(texts, batch_images, names, False, normalize)
        torch.testing.assert_close(uncached, expected, **TOL)
        for per_forward in (1, 2, 3, len(names)):  # class names per forward (rows = 3 x that)
            eval_model.class_batch_size = 3 * per_forward
            forwards.clear()
            cached = eval_model.rank_classifications(texts, batch_images, names, True, normalize)
            torch.testing.assert_close(cached, expected, **TOL, msg=lambda m, k=per_forward: f"{k} per forward: {m}")
            by_length = [lengths.count(n) for n in set(lengths) if n > 1]
            assert len(forwards) == 1 + sum(-(-count // per_forward) for count in by_length)
    hook.remove()
    # The names' token ids are kept for the last list: another list (here reversed) is tokenized afresh.
    reversed_scores = eval_model.rank_classifications(texts, batch_images, names[::-1], True, False)
    torch.testing.assert_close(reversed_scores, expected.flip(1), **TOL)
