"""The draws of `plan_trial` against the original harness's own `utils` functions, called in its order."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from reference_eval import init_single_process_group, load_original_evaluate

from modeling_flamingo.evaluation.datasets import EvalInputError
from modeling_flamingo.evaluation.sampling import plan_trial, shard_batches


def original_plan(num_test, num_train, seed, num_samples, query_set_size, shots, batch_size, ensembling):
    """What evaluate.py draws (world size 1): test order, and per item the demonstrations of each permutation."""
    utils = load_original_evaluate().utils
    test = [{"i": i} for i in range(num_test)]
    train = [{"i": i} for i in range(num_train)]
    effective = utils.compute_effective_num_shots(shots, "open_flamingo")
    np.random.seed(seed)
    loader = utils.prepare_eval_samples(test, num_samples if num_samples > 0 else num_test, batch_size)
    query_set = utils.get_query_set(train, query_set_size)
    utils.random_seed(seed, 0)
    order, demos = [], []
    for batch in loader:
        sampled = utils.sample_batch_demos_from_query_set(query_set, effective, len(batch["i"]))
        permutations = min(6, math.factorial(effective)) if ensembling else 1
        per_item = [[] for _ in batch["i"]]
        for _ in range(permutations):
            for i in range(len(batch["i"])):
                if ensembling:
                    random.shuffle(sampled[i])
                per_item[i].append([x["i"] for x in sampled[i]])
        order += batch["i"]
        demos += per_item
    return order, demos


@pytest.mark.parametrize(
    "num_test,num_train,seed,num_samples,query_set_size,shots,batch_size,ensembling",
    [
        (50, 40, 42, 20, 30, 4, 8, False),
        (50, 40, 42, 20, 30, 0, 8, False),
        (37, 100, 3, -1, 64, 8, 5, False),
        (30, 30, 7, 11, 30, 3, 4, True),
        (30, 30, 7, 11, 30, 0, 3, True),
    ],
)
def test_plan_replays_the_original_draws(
    tmp_path, num_test, num_train, seed, num_samples, query_set_size, shots, batch_size, ensembling
):
    init_single_process_group(tmp_path)
    order, demos = original_plan(num_test, num_train, seed, num_samples, query_set_size, shots, batch_size, ensembling)
    plan = plan_trial(num_test, num_train, seed, num_samples, query_set_size, shots, batch_size, ensembling)
    assert [p.index for p in plan] == order
    assert [p.demos for p in plan] == demos


def test_plan_leaves_global_random_state_alone():
    random.seed(1)
    np.random.seed(1)
    expected = (random.random(), np.random.rand())
    random.seed(1)
    np.random.seed(1)
    plan_trial(20, 20, 5, 10, 10, 4, 3)
    assert (random.random(), np.random.rand()) == expected


def test_shards_are_whole_batches_covering_the_plan():
    plan = plan_trial(23, 30, 0, -1, 16, 4, 4)
    shards = [shard_batches(plan, 4, rank, 3) for rank in range(3)]
    batches = [b for rank_batches in shards for b in rank_batches]
    assert sorted(p.index for b in batches for p in b) == sorted(p.index for p in plan)
    assert shards[1][0] == plan[4:8]  # batch k goes to process k % world size, unchanged


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_samples=30), "--num_samples 30 is larger than the test split"),
        (dict(query_set_size=50), "--query_set_size 50 is larger than the train split"),
        (dict(query_set_size=3, num_shots=4), "4 demonstrations cannot be drawn"),
    ],
)
def test_impossible_draws_are_explained(kwargs, message):
    args = dict(num_test=20, num_train=40, seed=0, num_samples=5, query_set_size=10, num_shots=2, batch_size=2)
    args.update(kwargs)
    with pytest.raises(EvalInputError, match=message):
        plan_trial(**args)
