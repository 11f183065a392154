import pytest

from pairs.rules import pairs_for_record


def same(ans, y):
    return ans.strip(". ").lower() == y.strip(". ").lower()


@pytest.mark.parametrize(
    "a, b, c, rule, expected",
    [
        ("Yes.", "yes", "No", "copy", [("cm", "Yes.", "Yes.", True), ("oa1", "Yes.", "No", False)]),
        ("Yes.", "yes", "Yes", "copy", [("cm", "Yes.", "Yes.", True)]),
        ("Yes.", "No", "Yes", "copy", []),
        ("Yes.", "No", "Yes", "wrong", [("cm", "Yes.", "No", False)]),
        ("Yes.", "yes", "Yes", "wrong", []),
        ("No", "No", "Yes.", "both", [("oa2", "Yes.", "No", False)]),
        ("No", "Yes", "No", "both", []),
        ("Yes", "No", "No", "both", [("cm", "Yes.", "No", False), ("oa1", "Yes", "No", False)]),
    ],
)
def test_rules_on_hand_made_answers(a, b, c, rule, expected):
    got = pairs_for_record("Yes.", a, b, c, same, rule)
    assert [(p.pair_type, p.chosen, p.rejected, p.rejected_noised) for p in got] == expected
