"""report.py: tables per machine kind, same-run ratios only, busy rows left out."""
import bench
import report
from test_results import _row, _variant


def _table_lines(text: str, machine: str) -> list[str]:
    section = text.split(f"#### {machine}\n\n", 1)[1].split("####", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ")]


def test_tables_per_machine_and_ratios_from_the_same_run(tmp_path):
    bench.append_row(tmp_path / "baseline.csv", _row(device_name="CPU: A", cpu_isa="avx2", decode_tok_s=50.0))
    bench.append_row(tmp_path / "kvcache.csv", _variant(device_name="CPU: A", cpu_isa="avx2"))
    before = report.render(report.load_rows(tmp_path), "results")
    # a user's rows from another machine, and a busy row on the first one
    bench.append_row(tmp_path / "baseline.csv", _row(device_name="CPU: B", cpu_isa="avx512_bf16", decode_tok_s=999.0,
                                                     run_id="r9"))
    bench.append_row(tmp_path / "kvcache.csv", _variant(device_name="CPU: A", cpu_isa="avx2", decode_tok_s=5.0,
                                                        decode_ratio=0.1, other_cpu_share=0.5, busy=True))
    after = report.render(report.load_rows(tmp_path), "results")
    assert _table_lines(after, "CPU: A (avx2)") == _table_lines(before, "CPU: A (avx2)")
    lines = _table_lines(after, "CPU: A (avx2)")
    assert len(lines) == 1 + 2  # header, baseline, kvcache: the busy row is out
    assert "| 0.90x |" in lines[-1] and "| 100.0% |" in lines[-1]  # decode ratio; peak vs unpatched
    assert "1 row(s) left out: other work used more than 10% of the CPU" in after
    assert len(_table_lines(after, "CPU: B (avx512_bf16)")) == 2
