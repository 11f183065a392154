import sys

import pytest

from common.stages import Stage, plan, run


def _stages(tmp_path):
    cfg = tmp_path / "a.yaml"
    cfg.write_text("x: 1\n")
    mk = lambda n: [sys.executable, "-c", "pass"]  # noqa: E731
    return cfg, [
        Stage("a", mk("a"), tmp_path / "a", [cfg]),
        Stage("b", mk("b"), tmp_path / "b"),
        Stage("c", mk("c"), tmp_path / "c"),
    ]


def todo(stages, **kw):
    return [s.name for s, _, r in plan(stages, **kw) if r]


def test_skip_force_from_and_config_change(tmp_path):
    cfg, stages = _stages(tmp_path)
    assert todo(stages) == ["a", "b", "c"]
    run(stages)
    assert todo(stages) == []
    assert todo(stages, force=True) == ["a", "b", "c"]
    assert todo(stages, start="b") == ["b", "c"]
    cfg.write_text("x: 2\n")  # a changed input redoes its stage and everything after it
    assert todo(stages) == ["a", "b", "c"]
    run(stages)
    (tmp_path / "b" / ".stage-b.json").unlink()  # output gone -> redo from there
    assert todo(stages) == ["b", "c"]
    with pytest.raises(ValueError, match="no such stage"):
        plan(stages, start="zzz")


def test_failed_stage_stops_and_leaves_no_stamp(tmp_path):
    bad = [Stage("bad", [sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "bad")]
    with pytest.raises(SystemExit):
        run(bad)
    assert not (tmp_path / "bad" / ".stage-bad.json").exists()
