"""bench.py --only rewrites rows in place and keeps the notes written under the table."""

from __future__ import annotations

from benches.bench import merged_rows, text_after_table


def test_only_keeps_other_rows_and_the_notes_under_the_table(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n| benchmark | ours |\n|---|---|\n| a | 1 |\n| b | 2 |\n\n"
                    "The b row was measured at load 8.\n")
    assert merged_rows(path, ["| b | 3 |", "| c | 4 |"]) == ["| a | 1 |", "| b | 3 |", "| c | 4 |"]
    assert text_after_table(path) == ["", "The b row was measured at load 8."]
    assert text_after_table(tmp_path / "missing.md") == []
