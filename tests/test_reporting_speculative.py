"""reporting/speculative.py: the table, sentences and plot drawn from results/speculative.csv."""
import csv
import dataclasses

import pytest

import bench
from reporting import speculative

FIELDS = [f.name for f in dataclasses.fields(bench.SpeculativeRow)]


def _row(**cells):
    base = dict(model="qwen2.5-coder-1.5b", quant="bf16", device="cpu", device_name="CPU: test", cpu_isa="avx2",
                layers_offloaded="2 4", draft="lookup", draft_bytes="0", prompt_kind="code", prompts="3",
                max_new_tokens="32", cold_reads="False", prefetch="0", accepted_per_verify="2",
                drafted_per_verify="3", read_bytes_per_token="50e6", plain_read_bytes_per_token="100e6",
                decode_tok_s="4", plain_decode_tok_s="2", vs_plain="2", resident_decode_tok_s="3",
                tokens_equal="True", prompts_differing="0", first_diff="", max_diff_gap="", busy="False",
                commit="abc")
    return {name: "" for name in FIELDS} | base | cells


def _write(folder, rows):
    with open(folder / "speculative.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return folder


def test_without_rows_the_section_names_the_command(tmp_path):
    assert speculative.section(tmp_path) == "No rows in results/speculative.csv yet: run `python sweep.py speculative`."
    assert speculative.answers(tmp_path) == [] and speculative.plot(tmp_path) == []


def test_answers_name_the_best_and_slowest_draft_and_leave_busy_rows_out(tmp_path):
    _write(tmp_path, [_row(), _row(draft="self:nf4", vs_plain="3", accepted_per_verify="4", draft_bytes="300e6",
                               read_bytes_per_token="25e6"),
                      _row(draft="qwen2.5-coder-0.5b", vs_plain="9", busy="True"),
                      _row(prompt_kind="wiki", vs_plain="0.8")])
    assert speculative.answers(tmp_path) == [
        "bf16 target, page cache, code prompts, constant schedule: the best draft, self:nf4, decodes at 3.00x plain stream decoding "
        "(4.0 tokens per target forward, so 0.25x the streamed bytes per token; it adds 300 MB resident); "
        "the slowest, lookup, at 2.00x.",
        "bf16 target, page cache, wiki prompts, constant schedule: the best draft, lookup, decodes at 0.80x plain stream decoding "
        "(2.0 tokens per target forward, so 0.50x the streamed bytes per token; it adds 0 MB resident).",
        "Tokens: every row equals plain stream decoding on every prompt (3 rows).",
    ]
    assert len(speculative.answers(tmp_path, ("code",))) == 2
    table = speculative.section(tmp_path)
    assert table.count("\n| bf16 |") == 3 and "9.00x" not in table


def test_the_default_schedule_answers_and_its_slow_rows_are_named(tmp_path):
    """Where a key has adaptive rows, the answer is theirs; constant rows (and rows from before the
    column, blank) only give the range when every verify asks the draft."""
    _write(tmp_path, [_row(vs_plain="0.5"), _row(schedule="constant", draft="self:nf4", vs_plain="0.25"),
                      _row(schedule="adaptive", vs_plain="0.97", plain_steps="80"),
                      _row(schedule="adaptive", draft="self:nf4", vs_plain="0.85", plain_steps="90")])
    best, slow, tokens = speculative.answers(tmp_path)
    assert best.startswith("bf16 target, page cache, code prompts, adaptive schedule: the best draft, lookup, "
                           "decodes at 0.97x") and best.endswith("the slowest, self:nf4, at 0.85x.")
    assert slow == ("At the default (adaptive) schedule, 1 of 2 rows run below 0.9x plain: self:nf4 (bf16, page cache, "
                    "code: 0.85x); asked at every verify (constant), the same drafts range from 0.25x to 0.50x from "
                    "the page cache.")
    assert tokens == "Tokens: every row equals plain stream decoding on every prompt (4 rows)."
    assert "| adaptive | 90 |" in speculative.section(tmp_path)


@pytest.mark.parametrize("cold,prefetch,expected", [("False", "0", "page cache"), ("True", "0", "cold"),
                                                    ("True", "2", "cold, read-ahead 2")])
def test_reads(cold, prefetch, expected):
    assert speculative.reads(_row(cold_reads=cold, prefetch=prefetch)) == expected


def test_a_differing_row_shows_its_gap(tmp_path):
    _write(tmp_path, [_row(), _row(tokens_equal="False", prompts_differing="1", first_diff="HumanEval/1@7",
                               max_diff_gap="0.0625")])
    assert speculative.answers(tmp_path)[-1] == (
        "Tokens: 1 of 2 rows equal plain stream decoding on every prompt; in the others a token differs where the "
        "target's top two logits are at most 0.0625 apart (a verify forward over several positions rounds "
        "differently).")
    assert "1 differ (gap <= 0.0625)" in speculative.section(tmp_path)


def test_plot(tmp_path):
    _write(tmp_path, [_row(), _row(draft="self:nf4", draft_bytes="300e6", vs_plain="3")])
    (path,) = speculative.plot(tmp_path)
    assert path == tmp_path / "speculative.png" and path.stat().st_size > 0


def test_headline_names_the_best_draft_from_the_page_cache_and_from_a_cold_disk(tmp_path):
    _write(tmp_path, [
        _row(draft="lookup", schedule="adaptive", vs_plain="1.2", accepted_per_verify="1.5"),
        _row(draft="qwen2.5-coder-0.5b", schedule="adaptive", vs_plain="0.8", draft_bytes="700e6"),
        _row(draft="qwen2.5-coder-0.5b", cold_reads="True", schedule="constant", vs_plain="3.1"),
        _row(draft="lookup", cold_reads="True", schedule="constant", vs_plain="1.1"),
    ])
    assert speculative.headline(tmp_path) == (
        "CPU: test (avx2), qwen2.5-coder-1.5b target: the best draft decodes at 1.20x plain stream decoding from the "
        "page cache (lookup, bf16, code prompts, 1.5 tokens per verify, adaptive schedule) and at 3.10x from a cold "
        "disk (qwen2.5-coder-0.5b, bf16, constant schedule); at the adaptive schedule 1 of 2 rows run below 0.9x plain.")
    table = speculative.best_table(tmp_path)
    assert "| bf16 | page cache | code | adaptive | lookup | 1.20x | 1.5 | 0.50x | 0.0 | qwen2.5-coder-0.5b 0.80x |" in table
    assert speculative.headline(_write(tmp_path, [_row(schedule="adaptive")])) is None  # nothing cold
    (tmp_path / "none").mkdir()
    assert speculative.best_table(tmp_path / "none") == ""
