"""reporting/streaming.py: peers, cold-read, batch and profile blocks from their rows."""
import bench
import run_peers
from reporting import streaming
from test_results import _row


def _peer(system, tok_s, run_id="r1", **changes):
    values = dict(system=system, model="m", quant="bf16", device="cpu", device_name="CPU: x", layers="even",
                  layers_offloaded="2 4", n_layers=8, prefetch=0 if system == "stream" else None, max_new_tokens=8,
                  batch_size=1, repeats=3, decode_tok_s=tok_s, resident_decode_tok_s=20.0,
                  ratio_to_resident=None if tok_s is None else tok_s / 20.0, idle_bytes=1_000_000,
                  peak_bytes=2_000_000, rss_delta_bytes=-5, note="", run_id=run_id, command="c",
                  **bench.environment())
    values.update(changes)
    return run_peers.PeerRow(**values)


def test_peers_block_states_the_same_run_ratio(tmp_path):
    for row in (_peer("resident", 20.0), _peer("stream", 15.0), _peer("accelerate-disk", 5.0),
                _peer("airllm", 0.1, layers_offloaded="0 1 2 3 4 5 6 7")):
        bench.append_row(tmp_path / "peers.csv", row)
    text = streaming.sections(tmp_path)["peers"]
    assert "| m | bf16 | stream | 2/8 | 15.00 | 0.75x | 3.00x accelerate-disk |" in text
    assert "| m | bf16 | accelerate-disk | 2/8 | 5.00 | 0.25x | ours 3.00x |" in text
    assert "| m | bf16 | airllm | 8/8 | 0.10 |" in text


def test_batch_block_leaves_busy_rows_out_and_missing_files_name_their_command(tmp_path):
    common = dict(variant="diskoffload", mode="stream", prefetch=0, decode_ratio=0.95, baseline_decode_tok_s=30.0)
    bench.append_row(tmp_path / "batch.csv", _row(**common, batch_size=16, decode_tok_s=28.5, repeats=5))
    bench.append_row(tmp_path / "batch.csv", _row(**common, batch_size=4, decode_tok_s=9.0, busy=True))
    text = streaming.sections(tmp_path)
    assert "| CPU: x (" in text["batch"] and "| m | fp32 | diskoffload | stream p0 | 16 | 28.5 |" in text["batch"]
    assert "| machine | model |" in text["batch"]  # a row names the machine kind it was measured on
    assert "| 4 |" not in text["batch"]
    assert text["cold"] == "No rows in results/cold.csv yet: run `python run_diskoffload.py --cold --out results/cold.csv`."


def test_answers_come_from_the_rows(tmp_path):
    for row in (_peer("resident", 20.0), _peer("stream", 15.0, peak_bytes=1_500_000), _peer("accelerate-disk", 5.0)):
        bench.append_row(tmp_path / "peers.csv", row)
    peers = streaming.peers_answers(tmp_path)
    assert peers[0].startswith("**m bf16: ours is 3.00x accelerate's disk offload** (15.00 against 5.00 tok/s")
    assert "ours peaks lower (1.5 against 2.0 MB)" in peers[0] and "0.75x the resident model (20.00 tok/s)" in peers[0]
    common = dict(variant="diskoffload", mode="stream", prefetch=0, baseline_decode_tok_s=30.0, loads=26)
    for batch, ratio, ms in ((1, 0.9, 100.0), (16, 1.0, 400.0)):
        bench.append_row(tmp_path / "batch.csv", _row(**common, batch_size=batch, decode_ratio=ratio, decode_ms_per_tok=ms))
    assert streaming.batch_answers(tmp_path) == [
        "**Stream against the resident model, same run**: batch 1 0.90x, batch 16 1.00x; a step grows from 100 ms "
        "(batch 1) to 400 ms (batch 16), while the layer reads stay the same (26 per run at every batch size)."]
    assert streaming.cold_answers(tmp_path) == [] and streaming.profile_answers(tmp_path) == []
