"""profile_step.py: op rows for both modes of one tiny run, and its one-line errors."""
import pytest
from tiny_checkpoint import save_tiny_checkpoint

import bench
import profile_step


@pytest.mark.parametrize("variant, mode", [("diskoffload", "stream"), ("kvcache", "session")])
def test_rows_for_resident_and_the_variant(variant, mode, tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny")
    out = tmp_path / "profile.csv"
    assert profile_step.main(["--model", str(checkpoint), "--quant", "fp32", "--variant", variant,
                              "--batch-size", "2", "--repeats", "1", "--max-new-tokens", "3", "--prefetch", "0",
                              "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]) == 0
    rows = bench.read_rows(out)
    assert {r["mode"] for r in rows} == {"resident", mode}
    assert all(r["batch_size"] == "2" and r["steps"] == "2" for r in rows)
    for wanted in ("resident", mode):
        mine = [float(r["self_ms_per_step"]) for r in rows if r["mode"] == wanted]
        assert mine == sorted(mine, reverse=True) and len(mine) == profile_step.TOP_OPS


def test_baseline_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        profile_step.main(["--variant", "baseline", "--out", str(tmp_path / "p.csv")])
    assert exit_.value.code == 2 and "invalid choice: 'baseline'" in capsys.readouterr().err
