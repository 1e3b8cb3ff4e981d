"""reporting/beyond.py: the byte-breakdown table and plot of results/beyond.csv, from made-up rows."""
import bench
from reporting import beyond
from test_results import _row

PARTS = dict(embedding_bytes=50_000_000, head_bytes=0, resident_layers_bytes=30_000_000, other_bytes=1_000)


def _beyond(tmp_path, **changes):
    values = dict(model="m", quant="nf4", quant_head="none", embedding_residency="resident", tied_embeddings=True,
                  ppl=10.0, ppl_tokens=1023, **PARTS)
    values.update(changes)
    values.setdefault("standby_bytes", sum(values[k] for k in PARTS))
    values.setdefault("command", f"python run_x.py {sorted(changes.items())}")
    bench.append_row(tmp_path / "beyond.csv", _row(**values))


def _steps(tmp_path):
    _beyond(tmp_path, variant="baseline", mode="resident", resident_layers_bytes=60_000_000,
            peak_bytes=110_001_000, decode_tok_s=5.0)
    _beyond(tmp_path, variant="kvcache", mode="session", peak_bytes=110_001_000, decode_tok_s=4.0, decode_ratio=0.8)
    _beyond(tmp_path, variant="kvcache", mode="session", embedding_residency="tied", peak_bytes=110_001_000,
            decode_tok_s=4.0, decode_ratio=0.8, busy=True)
    _beyond(tmp_path, variant="kvcache", mode="session", embedding_residency="disk", quant_head="nf4",
            embedding_bytes=0, head_bytes=14_000_000, ppl=12.5, peak_bytes=74_001_000, decode_tok_s=3.0,
            decode_ratio=0.6)


def test_table_states_each_step_against_the_unpatched_row(tmp_path):
    _steps(tmp_path)
    text = beyond.sections(tmp_path)["beyond"]
    assert "| m | unpatched | 110.0 | 100% | 110.0 | 50.0 | 0.0 | 60.0 | 5.00 | 10.000 |" in text
    assert "| m | layers offloaded | 80.0 | 73% | 110.0 | 50.0 | 0.0 | 30.0 | 4.00 (0.80x) | 10.000 (= unpatched) |" in text
    # a busy row shows no speed; a tied embedding is kept, and the row says so
    assert "| m | layers offloaded + embedding (tied: kept) | 80.0 | 73% | 110.0 | 50.0 | 0.0 | 30.0 | busy |" in text
    assert "| m | layers offloaded + embedding rows + NF4 head | 44.0 | 40% | 74.0 | 0.0 | 14.0 | 30.0 | 3.00 (0.60x) | 12.500 (+25.00%) |" in text
    assert "head is tied to the input embedding: m." in text


def test_missing_file_names_its_command(tmp_path):
    assert beyond.sections(tmp_path)["beyond"] == (
        "No rows in results/beyond.csv yet: run `python sweep.py beyond`.")
    assert beyond.plots(tmp_path) == []


def test_plot_is_written(tmp_path):
    _steps(tmp_path)
    assert beyond.plots(tmp_path) == [tmp_path / "beyond.png"]
    assert (tmp_path / "beyond.png").stat().st_size > 0
