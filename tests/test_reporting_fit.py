"""reporting/fit.py: results/fit.csv's cases, as README's line and results/README.md's tables."""
import dataclasses

import bench
import run_fit
from reporting import fit


def _row(case, config, tok_s, predicted, fits=True, fastest=False, over=None, busy=False, **fields):
    values = dict(
        case_id=case, config=config, model="m", weights="real", quant="bf16", device="cpu", device_name="CPU: X",
        cold_reads=False, device_budget_bytes=100 * 2**20, budget_share=0.5, model_bytes=200 * 2**20,
        kv_reserve_bytes=2**20, context_tokens=34, placement="interleaved", streamed_layers="1 3", prefetch=0,
        cpu_read="copy", embedding_residency="disk", draft="", draft_bytes=0, tokens_per_verify=None,
        predicted_decode_tok_s=predicted, predicted_peak_bytes=90 * 2**20,
        decode_tok_s=tok_s, decode_tok_s_q1=tok_s, decode_tok_s_q3=tok_s, predicted_over_measured=predicted / tok_s,
        peak_bytes=90 * 2**20 if fits else 150 * 2**20, fits=fits, fastest_fitting=fastest, plan_over_fastest=over,
        max_new_tokens=24, rounds=4, other_cpu_share=0.5 if busy else 0.01, busy=busy, rates="r", command="c",
        run_id="r1")
    environment = {name: "" for name in bench.ENVIRONMENT_FIELDS}
    environment.update(cpu_isa="avx2", torch_threads=2, commit="abc1234")
    for name, value in fields.items():
        (environment if name in bench.ENVIRONMENT_FIELDS else values)[name] = value
    return run_fit.FitRow(**values, **environment)


def _write(tmp_path, rows):
    bench.append_rows(tmp_path / "fit.csv", rows)
    return tmp_path


def test_the_summary_counts_what_the_rows_say(tmp_path):
    results = _write(tmp_path, [
        _row("a", "plan", 10.0, 10.5, fastest=True, over=1.0),          # the fastest, predicted within 5%
        _row("a", "grid:last:copy:0", 9.0, 10.5),
        _row("a", "default-copy", 11.0, 9.0, fits=False),               # faster, but over the budget
        _row("b", "plan", 8.0, 12.0, over=0.8, cold_reads=True),        # 0.8x the fastest, predicted 50% high
        _row("b", "grid:first-fit:copy:0", 10.0, 12.0, fastest=True, cold_reads=True),
        _row("b", "default-copy", 10.0, 11.0, cold_reads=True),          # fits and beats the plan
    ])
    assert fit.summary(results) == (
        "In 2 cases (CPU: X (avx2)) the plan ran at >= 0.95x the fastest configuration that fits in 1, was predicted "
        "within 20% in 1, kept its peak and KV reserve within the budget in 2, and matched today's defaults (where "
        "they fit) in 1.")
    section = fit.section(results)
    assert "| CPU: X (avx2) | m bf16 | page cache | 100 MiB (50%) | 2 streamed, interleaved, prefetch 0, copy | 10.00 |" \
        in section
    assert "grid:first-fit:copy:0 10.00 | 0.80x | 10.00 |" in section
    assert "11.00 (over)" in section
    assert "Every configuration:" in section


def test_the_newest_case_of_a_kind_stands_for_it(tmp_path):
    results = _write(tmp_path, [_row("old", "plan", 5.0, 5.0, fastest=True, over=1.0, timestamp="2026-01-01T00:00:00"),
                                _row("new", "plan", 9.0, 9.0, fastest=True, over=1.0, timestamp="2026-02-01T00:00:00")])
    assert list(fit.cases(results)) == ["new"]


def test_a_busy_case_is_left_out(tmp_path):
    results = _write(tmp_path, [_row("a", "plan", 10.0, 10.0, fastest=True, over=1.0),
                                _row("b", "plan", 10.0, 10.0, fastest=True, over=1.0, busy=True, cold_reads=True)])
    assert fit.summary(results).startswith("In 1 cases")


def test_no_rows_says_how_to_make_them(tmp_path):
    assert fit.summary(tmp_path) is None
    assert "python sweep.py fit" in fit.section(tmp_path)


def test_fit_rows_document_every_column():
    docs = bench.column_docs(run_fit.FitRow)
    own = [f.name for f in dataclasses.fields(run_fit.FitRow) if f.name not in bench.ENVIRONMENT_FIELDS]
    assert [name for name in own if name not in docs] == []


def test_a_draft_case_is_its_own_and_counts_the_drafts_bytes(tmp_path):
    results = _write(tmp_path, [
        _row("plain", "plan", 10.0, 10.0, fastest=True, over=1.0),
        _row("drafted", "plan", 12.0, 12.0, fastest=True, over=1.0, draft="lookup", draft_bytes=2**20,
             tokens_per_verify=1.5),
        _row("drafted", "plan-alternative", 10.0, 10.0),
    ])
    assert set(fit.cases(results)) == {"plain", "drafted"}  # the same budget, but another question
    section = fit.section(results)
    assert "| m bf16, --draft lookup | page cache |" in section
    assert "2 streamed, interleaved, prefetch 0, copy, draft lookup" in section
    assert "92.0 MiB fits" in section  # 90 MiB peak + 1 MiB KV + 1 MiB draft
