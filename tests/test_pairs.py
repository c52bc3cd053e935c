"""Pair forming and the evaluation interval, against hand-written expectations."""

import random

import pytest

from dtrpo.evaluate import interval95
from dtrpo.pairs import form_pairs

SCORED = [("a", 0.0), ("b", 1.0), ("c", 0.5), ("d", 1.0)]


def test_best_worst_takes_the_first_best_and_the_first_worst():
    assert form_pairs(SCORED, "best_worst", None, random.Random(0)) == [(1, 0)]
    assert form_pairs([("a", 1.0), ("b", 1.0)], "best_worst", None, random.Random(0)) == []  # no worse answer


def test_all_ordered_pairs_with_a_strictly_higher_score_first():
    want = [(1, 0), (1, 2), (2, 0), (3, 0), (3, 2)]
    assert sorted(form_pairs(SCORED, "all", None, random.Random(0))) == want
    capped = form_pairs(SCORED, "all", 2, random.Random(0))
    assert len(capped) == 2 and set(capped) <= set(want)
    with pytest.raises(ValueError, match="pairing"):
        form_pairs(SCORED, "some", None, random.Random(0))


def test_wilson_interval_by_hand():
    # 5 right of 10, z = 1.96: centre (0.5 + 0.19208) / 1.38416 = 0.5,
    # half = 1.96 * sqrt(0.025 + 0.009604) / 1.38416 = 0.263404 -> [0.236596, 0.763404]
    low, high = interval95([1.0] * 5 + [0.0] * 5)
    assert abs(low - 0.236596) < 1e-5 and abs(high - 0.763404) < 1e-5
    low, high = interval95([0.0] * 20)
    assert low == 0.0 and 0 < high < 0.2
    low, high = interval95([0.0, 0.5, 1.0])  # not 0/1: the normal interval of the mean, 0.5 +- 1.96 * 0.5 / sqrt 3
    assert abs(low - (0.5 - 1.96 * 0.5 / 3**0.5)) < 1e-9
