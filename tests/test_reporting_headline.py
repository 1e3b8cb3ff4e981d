"""reporting/headline.py: README.md's short blocks, from made-up rows, each ending with its link."""
import bench
from reporting import headline
from test_reporting_beyond import _steps
from test_results import _variant

LINK = "results/README.md#x"


def test_exactness_states_each_format_and_the_naive_gap():
    rows = [dict(model="m", quant=q, form=form, device="cpu", device_name="CPU: X", cpu_isa="avx2",
                 logits_equal=str(form != "naive"), tokens_equal="True", max_abs_logit_diff="0" if form != "naive" else "0.25",
                 standby_bytes_before="2000000", standby_bytes_after="1000000")
            for q in ("fp32", "nf4") for form in ("session", "stream", "naive")]
    text = headline.exactness(rows, LINK)
    assert "| CPU: X (avx2) | m | yes: fp32, nf4 (session, stream) | 0.25 | 0.25 |" in text
    assert text.endswith(f"({LINK}).")
    rows[0]["logits_equal"] = "False"  # one exact form that is not: the block says so
    assert "| NO: fp32, nf4" in headline.exactness(rows, LINK)


def test_streaming_block_pairs_session_and_stream_of_a_model(tmp_path):
    bench.append_row(tmp_path / "kvcache.csv", _variant(device_name="CPU: A", cpu_isa="avx2", decode_ratio=0.9))
    bench.append_row(tmp_path / "diskoffload.csv", _variant(device_name="CPU: A", cpu_isa="avx2", variant="diskoffload",
                                                            mode="stream", prefetch=0, peak_bytes=800, decode_ratio=1.1))
    from reporting import runs
    text = headline.streaming_memory(runs.load_rows(tmp_path), LINK)
    assert text.startswith("CPU: A (avx2);")
    assert "| m | fp32 | 0.0 -> 0.0 | 0.0 | 0.0 | 0.90x | 1.10x (copied) |" in text  # a row from before --cpu-read
    # the noise band comes from the session rows only (the same computation as the unpatched model)
    assert "Session ratios, same computation as the unpatched model, spread from 0.90x to 0.90x" in text


def test_beyond_levers_split_exact_from_approximate(tmp_path):
    _steps(tmp_path)
    text = headline.beyond_levers(tmp_path, LINK)
    # unpatched 110 MB; exact: layers offloaded 80 MB; with the NF4 head 44 MB at +25% perplexity
    assert "| m | 110.0 | 80.0 (73%) | 44.0 (40%) | +25.00% |" in text


def test_empty_results_name_the_command(tmp_path):
    assert "run_peers.py" in headline.peers(tmp_path, LINK)
    assert "sweep.py load" in headline.load_peaks(tmp_path, LINK)
    assert "sweep.py beyond" in headline.beyond_levers(tmp_path, LINK)
    assert "check_exact.py" in headline.exactness([], LINK)
