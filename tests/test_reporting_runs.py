"""reporting/runs.py: tables per machine kind, same-run ratios only, busy rows left out."""
import bench
from reporting import runs
from test_results import _row, _variant


def _table_lines(text: str, machine: str) -> list[str]:
    section = text.split(f"#### {machine}\n\n", 1)[1].split("####", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ")]


def test_tables_per_machine_and_ratios_from_the_same_run(tmp_path):
    bench.append_row(tmp_path / "baseline.csv", _row(device_name="CPU: A", cpu_isa="avx2", decode_tok_s=50.0))
    bench.append_row(tmp_path / "kvcache.csv", _variant(device_name="CPU: A", cpu_isa="avx2"))
    before = runs.render(runs.load_rows(tmp_path), "results")
    # a user's rows from another machine, and a busy row on the first one
    bench.append_row(tmp_path / "baseline.csv", _row(device_name="CPU: B", cpu_isa="avx512_bf16", decode_tok_s=999.0,
                                                     run_id="r9"))
    bench.append_row(tmp_path / "kvcache.csv", _variant(device_name="CPU: A", cpu_isa="avx2", decode_tok_s=5.0,
                                                        decode_ratio=0.1, other_cpu_share=0.5, busy=True))
    after = runs.render(runs.load_rows(tmp_path), "results")
    assert _table_lines(after, "CPU: A (avx2)") == _table_lines(before, "CPU: A (avx2)")
    lines = _table_lines(after, "CPU: A (avx2)")
    assert len(lines) == 1 + 2  # header, baseline, kvcache: the busy row is out
    assert "| 0.90x |" in lines[-1] and "| 100.0% |" in lines[-1]  # decode ratio; peak vs unpatched
    assert "1 row(s) left out: other work used more than 10% of the CPU" in after
    assert len(_table_lines(after, "CPU: B (avx512_bf16)")) == 2


def test_lead_section_sets_our_rows_beside_the_original(tmp_path):
    model = runs.LEAD_MODEL
    common = dict(model=model, quant="nf4", device_name="CPU: A", cpu_isa="avx2", n_layers=28)
    layers = dict(layers="even", layers_offloaded=" ".join(map(str, range(2, 25, 2))))
    bench.append_row(tmp_path / "baseline.csv", _row(**common, standby_bytes=1_600_000_000, ppl=9.87654,
                                                     ppl_dataset="wiki-embedded", ppl_tokens=8176, ppl_ctx=512))
    bench.append_row(tmp_path / "kvcache.csv", _variant(**common, **layers, standby_bytes=1_300_000_000,
                                                        peak_bytes=1_600_000_000, baseline_standby_bytes=1_600_000_000,
                                                        decode_tok_s=0.6, baseline_decode_tok_s=0.62,
                                                        decode_ratio=0.6 / 0.62))
    bench.append_row(tmp_path / "diskoffload.csv", _variant(**common, **layers, variant="diskoffload", mode="stream",
                                                            prefetch=0, standby_bytes=1_300_000_000,
                                                            peak_bytes=1_330_000_000,
                                                            baseline_standby_bytes=1_600_000_000, ppl=9.87654))
    text = runs.lead_section(runs.load_rows(tmp_path))
    assert f"this repo: {model} NF4, CPU: A (avx2) |" in text
    assert "| layers offloaded | 16 of 36 (even 2..32) | 12 of 28 (even) |" in text
    assert '| 1.92 -> 1.34 "GB" (-30%) | 1.60 GB -> 1.30 GB (-19%) |' in text
    assert "session 1.60 GB; stream 1.33 GB (-17%) |" in text
    # perplexity: not in the table (the original's figure is five short sentences), a note of its own
    assert "| perplexity |" not in text and "9.8765" not in text.split("\n\n")[1]
    note = text.split("\n\n")[-1]
    assert note.startswith("Perplexity is not comparable across these columns")
    assert ("the original's 3.46 -> 3.43 scores five short sentences one by one; qwen2.5-coder-1.5b scores 8176 "
            "tokens of wiki-embedded in windows of 512 (9.88 unpatched)") in note
    assert "0.60 vs 0.62 tok/s unpatched, same run: 0.97x" in text
    assert runs.lead_section([]).startswith("(no ")
    assert "dummy" not in text  # no column for the original's shape until it has rows


def test_the_originals_shape_gets_a_column_in_gib_and_a_units_note(tmp_path):
    real = dict(model=runs.LEAD_MODEL, quant="nf4", device_name="CPU: A", cpu_isa="avx2", n_layers=28)
    bench.append_row(tmp_path / "kvcache.csv", _variant(**real, baseline_standby_bytes=1_600_000_000))
    dummy = dict(model=runs.DUMMY_ORIGINAL, weights="dummy", quant="nf4", device_name="CPU: A", cpu_isa="avx2",
                 n_layers=36, layers="even", layers_offloaded=" ".join(map(str, range(2, 33, 2))))
    bench.append_row(tmp_path / "baseline.csv", _row(**{k: v for k, v in dummy.items() if "layers" not in k},
                                                     standby_bytes=2**31))
    bench.append_row(tmp_path / "kvcache.csv", _variant(**dummy, baseline_standby_bytes=2**31,
                                                        standby_bytes=1.34 * 2**30, peak_bytes=2**31))
    text = runs.lead_section(runs.load_rows(tmp_path))
    header = text.split("\n\n")[1].splitlines()[0]
    assert header.endswith(f"| this repo: the original's shape, {runs.DUMMY_ORIGINAL} NF4 (dummy weights), CPU: A (avx2) |")
    assert "| 16 of 36 (even 2..32) | 2 of 28 (even) | 16 of 36 (even) |" in text
    assert "| 2.00 GiB (2.15 GB) -> 1.34 GiB (1.44 GB) (-33%) |" in text
    assert "Perplexity is not comparable" not in text  # no real-weight baseline with a perplexity: no note
    assert text.endswith("read as GiB, 0.960x and 1.000x; read as 10^9 bytes, 0.894x and 0.931x.")


def test_nf4_against_bf16_and_the_spread_of_paired_ratios(tmp_path):
    common = dict(device_name="CPU: A", cpu_isa="avx2")
    bench.append_row(tmp_path / "baseline.csv", _row(**common, quant="bf16", decode_tok_s=4.0))
    bench.append_row(tmp_path / "baseline.csv", _row(**common, quant="nf4", decode_tok_s=0.5))
    bench.append_row(tmp_path / "kvcache.csv", _variant(**common, quant="nf4", decode_ratio=0.9))
    bench.append_row(tmp_path / "kvcache.csv", _variant(**common, quant="nf4", decode_ratio=1.05))
    bench.append_row(tmp_path / "diskoffload.csv", _variant(**common, quant="nf4", variant="diskoffload", decode_ratio=0.7))
    rows = runs.load_rows(tmp_path)
    assert runs.nf4_cpu_answers(rows) == [
        "CPU: A (avx2), m unpatched: bf16 decodes 4.00 tok/s, NF4 0.50 tok/s (8.0x slower in NF4)."]
    # the noise band: the session rows only; the stream's 0.70x is a cost, outside it
    assert "spread from 0.90x to 1.05x: that is the noise of one ratio" in runs.lead_answers(rows, tmp_path)[-1]
