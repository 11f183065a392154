"""RULE's calibrated k on hand-made validation errors: the bound computed by hand, the rule's pick."""

import math

import pytest

from retriever.select_k import calibrated_k, risk_p_value


def _errors(wrong: int, n: int = 40) -> list[int]:
    return [1] * wrong + [0] * (n - wrong)


def _hoeffding(wrong: int, n: int, alpha: float) -> float:
    """exp(-n h(min(r, alpha), alpha)), h(a, b) = a log(a/b) + (1-a) log((1-a)/(1-b)), r = wrong / n, 0 log 0 = 0."""
    a = min(wrong / n, alpha)
    first = a * math.log(a / alpha) if a > 0 else 0.0
    return math.exp(-n * (first + (1 - a) * math.log((1 - a) / (1 - alpha))))


def _bentkus(wrong: int, n: int, alpha: float) -> float:
    """e * P(Binomial(n, alpha) <= wrong), the binomial tail summed term by term."""
    return math.e * sum(math.comb(n, i) * alpha ** i * (1 - alpha) ** (n - i) for i in range(wrong + 1))


@pytest.mark.parametrize("wrong", [0, 3, 5, 6, 10, 18])
def test_p_values_are_the_bounds_computed_by_hand(wrong):
    assert risk_p_value(wrong / 40, 40, 0.3, "hoeffding") == pytest.approx(_hoeffding(wrong, 40, 0.3), rel=1e-9)
    by_hand = min(_hoeffding(wrong, 40, 0.3), _bentkus(wrong, 40, 0.3))
    assert risk_p_value(wrong / 40, 40, 0.3) == pytest.approx(by_hand, rel=1e-6)


def test_the_rule_picks_what_the_bound_says():
    # 40 questions, alpha 0.3, delta 0.1, four k tried: H_k is rejected when p <= 0.1 / 4 = 0.025.
    # By hand (n=40, alpha=0.3): 6 wrong: Hoeffding 0.0870, Bentkus 0.0646 -> kept;
    # 5 wrong: Hoeffding 0.0323, Bentkus 0.0234 -> rejected by Hoeffding-Bentkus only;
    # 4 wrong: Hoeffding 0.0095, Bentkus 0.0070 -> rejected by both; 18 wrong (0.45 > alpha): p = 1.
    assert _bentkus(5, 40, 0.3) < 0.025 < _hoeffding(5, 40, 0.3) and _bentkus(6, 40, 0.3) > 0.025
    tie = {1: _errors(6), 2: _errors(5), 3: _errors(5), 4: _errors(18)}
    assert calibrated_k(tie, alpha=0.3, delta=0.1) == 2  # k=2 and k=3 safe at the same risk: the smaller
    assert calibrated_k(tie, alpha=0.3, delta=0.1, bound="hoeffding") is None  # Hoeffding alone proves none
    best = {1: _errors(6), 2: _errors(5), 3: _errors(4), 4: _errors(18)}
    assert calibrated_k(best, alpha=0.3, delta=0.1) == 3  # the lowest risk among the safe ones
    assert calibrated_k(best, alpha=0.3, delta=0.1, bound="hoeffding") == 3
    # More k tried makes the Bonferroni threshold stricter: with 20 candidates (0.005) none passes.
    many = {**best, **{k: _errors(18) for k in range(5, 21)}}
    assert calibrated_k(many, alpha=0.3, delta=0.1) is None


def test_too_few_questions_prove_nothing():
    # 5 questions all right: the best possible p is 0.7^5 = 0.168 (Hoeffding), above delta.
    assert risk_p_value(0.0, 5, 0.3, "hoeffding") == pytest.approx(0.7 ** 5)
    assert calibrated_k({1: [0] * 5}, alpha=0.3, delta=0.1) is None


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="0/1"):
        calibrated_k({1: [0, 2]}, 0.3, 0.1)
    with pytest.raises(ValueError, match="non-empty"):
        calibrated_k({1: []}, 0.3, 0.1)
    with pytest.raises(ValueError, match="alpha"):
        calibrated_k({1: [0]}, 0.0, 0.1)
