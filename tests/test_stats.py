"""common.stats: the Wilson interval of an accuracy."""

from __future__ import annotations

import pytest

from common.stats import wilson


def test_wilson_interval_of_an_accuracy():
    low, high = wilson(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0
    with pytest.raises(ValueError, match="n = 0"):
        wilson(0, 0)
