"""The paper's train/test split, reproduced without `datasets`, plus a clean dev set.

The paper splits ACL 60/60 (884 rows) with `Dataset.train_test_split(test_size=100, seed=0)`.
For an integer test_size and the default shuffle=True, datasets (3.x to 5.x) does:

    permutation = np.random.default_rng(seed).permutation(n)
    test  = permutation[:test_size]          # test rows come first ...
    train = permutation[test_size:]          # ... train is the rest, in permutation order

and `select` keeps that order, so both parts are in permuted (not sorted) order. We return the
same index lists so stcompress scores the paper's exact 100 test segments, in the same order,
without needing `datasets` at all (tests check equality against the real call).

The reference code used those 100 test rows for layer selection too. `dev` is our fix: the first
`dev_size` rows of the paper's train order, taken out of train, so train / dev / test are disjoint
and the test set stays exactly the paper's.
"""

from __future__ import annotations

import numpy as np

from stcompress.errors import DataError

SUBSETS = ("all", "train", "dev", "test")


def paper_split(n: int, test_size: int, seed: int) -> tuple[list[int], list[int]]:
    """(train_indices, test_indices) exactly as `train_test_split(test_size=test_size, seed=seed)`.

    Unlike datasets we allow test_size=0 (everything is train, still shuffled), so a dev set
    can be carved from a dataset used without a test part.
    """
    if isinstance(test_size, bool) or not isinstance(test_size, (int, np.integer)):
        raise DataError(f"data.test_size: must be a whole number of rows, got {test_size!r}; e.g. test_size: 100")
    if n < 1:
        raise DataError("dataset: it has no rows, so it cannot be split; check the dataset and split name")
    if not 0 <= test_size < n:
        raise DataError(f"data.test_size: {test_size} must be at least 0 and smaller than the {n} rows of the dataset; lower it")
    permutation = np.random.default_rng(seed).permutation(n)
    return permutation[test_size:].tolist(), permutation[:test_size].tolist()


def select_subset(n: int, subset: str, test_size: int, dev_size: int, seed: int) -> list[int]:
    """Row indices of `subset`; "all" keeps the dataset's own order, the others the split's order."""
    if subset not in SUBSETS:
        raise DataError(f"data.subset: unknown subset {subset!r}; use one of {', '.join(SUBSETS)}")
    if subset == "all":
        return list(range(n))
    if dev_size < 0:
        raise DataError(f"data.dev_size: {dev_size} is negative; use 0 (no dev set) or a positive row count")
    if n >= 1 and test_size + dev_size >= n:
        raise DataError(
            f"data.test_size + data.dev_size: {test_size} + {dev_size} leaves no training rows out of {n}; "
            "lower test_size or dev_size"
        )
    if subset == "test" and test_size == 0:
        raise DataError("data.subset: 'test' is empty because data.test_size is 0; pass --data.test-size N (the paper: 100)")
    if subset == "dev" and dev_size == 0:
        raise DataError("data.subset: 'dev' is empty because data.dev_size is 0; set dev_size (e.g. 100)")
    train, test = paper_split(n, test_size, seed)
    parts = {"train": train[dev_size:], "dev": train[:dev_size], "test": test}
    return parts[subset]
