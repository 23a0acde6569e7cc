"""Which test items are evaluated, in which order, with which demonstrations: the original harness's draws.

The original (`evaluate.py` + `utils.py`) does, per trial seed `s` and world size 1:

1. `np.random.seed(s)`; the test subset is `np.random.choice(len(test), num_samples, replace=False)`;
2. a `DistributedSampler` over that subset (shuffle on, its own seed 0) orders it: `torch.randperm(n)` drawn from
   a generator seeded with 0;
3. the query set is `np.random.choice(len(train), query_set_size, replace=False)` (random demonstrations only);
4. `random.seed(s)` (with torch and numpy); then batch after batch, each item draws `random.sample(query_set,
   shots)`, and with prompt ensembling every permutation round shuffles each item's demonstrations in place.

`plan_trial` replays exactly these calls, so the same seed gives the same items and demonstrations. The whole plan
is computed on every process and then split by whole batches (`shard_batches`), so a multi-process run evaluates the
very batches a single process would: same predictions, same score (the original instead reseeds per rank).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from modeling_flamingo.evaluation.datasets import EvalInputError


def effective_num_shots(num_shots: int) -> int:
    """Zero-shot still draws two demonstrations, whose text (without `<image>`) is kept, as Flamingo did."""
    return num_shots if num_shots > 0 else 2


def num_ensemble_permutations(shots: int, prompt_ensembling: bool) -> int:
    return min(6, math.factorial(shots)) if prompt_ensembling else 1


@dataclass
class PlannedItem:
    """One test item of a trial.

    Attributes:
        index: index into the test split.
        demos: one ordering of demonstration indices (into the train split) per ensembling permutation; without
            ensembling a single ordering.
    """

    index: int
    demos: list[list[int]]


def plan_trial(
    num_test: int,
    num_train: int,
    seed: int,
    num_samples: int,
    query_set_size: int,
    num_shots: int,
    batch_size: int,
    prompt_ensembling: bool = False,
    retrieve: Callable[[list[int], int], list[list[int]]] | None = None,
) -> list[PlannedItem]:
    """Replay the original's draws for one trial.

    Args:
        num_test, num_train: split sizes.
        num_samples: test items to evaluate (-1 or 0: all).
        num_shots: requested shots (0 draws two text-only demonstrations).
        batch_size: the original's batch size; only the prompt-ensembling shuffles depend on it.
        retrieve: RICES instead of random demonstrations: `retrieve(test_indices, k)` gives each item's k most
            similar train indices, most similar last (called per batch, as the original does).
    Returns:
        The items in evaluation order.
    """
    shots = effective_num_shots(num_shots)
    num_samples = num_samples if num_samples > 0 else num_test
    if num_samples > num_test:
        raise EvalInputError(f"--num_samples {num_samples} is larger than the test split ({num_test} items).")
    legacy = np.random.RandomState(seed)  # the generator behind np.random.seed / np.random.choice
    subset = legacy.choice(num_test, num_samples, replace=False)
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(0)).tolist()
    indices = [int(subset[j]) for j in order]

    if retrieve is None:
        if query_set_size > num_train:
            raise EvalInputError(
                f"--query_set_size {query_set_size} is larger than the train split ({num_train} items)."
            )
        if shots > query_set_size:
            raise EvalInputError(f"{shots} demonstrations cannot be drawn from a query set of {query_set_size}.")
        query_set = [int(i) for i in legacy.choice(num_train, query_set_size, replace=False)]

    # utils.random_seed(seed, rank=0): only Python's `random` is drawn from afterwards.
    rng = random.Random(seed)
    permutations = num_ensemble_permutations(shots, prompt_ensembling)
    plan: list[PlannedItem] = []
    for start in range(0, len(indices), batch_size):
        batch = indices[start : start + batch_size]
        if retrieve is None:
            demos = [rng.sample(query_set, shots) for _ in batch]
        else:
            demos = [list(row) for row in retrieve(batch, shots)]
        orderings: list[list[list[int]]] = [[] for _ in batch]
        for _ in range(permutations):
            for i in range(len(batch)):
                if prompt_ensembling:
                    rng.shuffle(demos[i])
                orderings[i].append(list(demos[i]))
        plan.extend(PlannedItem(index, ordering) for index, ordering in zip(batch, orderings, strict=True))
    return plan


def shard_batches(plan: list[PlannedItem], batch_size: int, rank: int, world_size: int) -> list[list[PlannedItem]]:
    """The batches of `plan` this process evaluates: batch k goes to process k % world_size."""
    batches = [plan[i : i + batch_size] for i in range(0, len(plan), batch_size)]
    return batches[rank::world_size]
