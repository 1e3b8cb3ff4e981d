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
                  **{**bench.environment(), "cpu_isa": "avx2"})  # a fixed machine kind, whichever runs the test
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
    assert "| CPU: x (" in text["batch"] and "| m | fp32 | diskoffload | stream p0, copy | 16 | 28.5 |" in text["batch"]
    assert "| machine | model |" in text["batch"]  # a row names the machine kind it was measured on
    assert "| 4 |" not in text["batch"]
    assert text["cold"] == "No rows in results/cold.csv yet: run `python run_diskoffload.py --cold --out results/cold.csv`."


def test_answers_come_from_the_rows(tmp_path):
    for row in (_peer("resident", 20.0), _peer("stream", 15.0, peak_bytes=1_500_000), _peer("accelerate-disk", 5.0)):
        bench.append_row(tmp_path / "peers.csv", row)
    peers = streaming.peers_answers(tmp_path)
    assert peers[0].startswith("**m bf16, layers copied (CPU: x (avx2)): ours is 3.00x accelerate's disk offload** "
                               "(15.00 against 5.00 tok/s")
    assert "ours peaks lower (1.5 against 2.0 MB)" in peers[0] and "0.75x the resident model (20.00 tok/s)" in peers[0]
    common = dict(variant="diskoffload", mode="stream", prefetch=0, baseline_decode_tok_s=30.0, loads=26)
    for batch, ratio, ms in ((1, 0.9, 100.0), (16, 1.0, 400.0)):
        bench.append_row(tmp_path / "batch.csv", _row(**common, batch_size=batch, decode_ratio=ratio, decode_ms_per_tok=ms))
    assert streaming.batch_answers(tmp_path) == [
        "**Stream (copy) against the resident model, same run**: batch 1 0.90x, batch 16 1.00x; a step grows from 100 ms "
        "(batch 1) to 400 ms (batch 16), while the layer reads stay the same (26 per run at every batch size)."]
    assert streaming.cold_answers(tmp_path) == [] and streaming.profile_answers(tmp_path) == []


def _cpu_read_csv(path, rows):
    import csv
    fields = ["model", "quant", "device_name", "cpu_isa", "batch_size", "prefetch", "cpu_read", "decode_tok_s",
              "baseline_decode_tok_s", "decode_ratio", "rss_anon_bytes", "peak_rss_anon_bytes", "rss_file_bytes", "standby_bytes",
              "peak_bytes", "repeats", "busy", "commit", "paired_ratio_median", "paired_ratio_q1", "paired_ratio_q3"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({**dict(model="m", quant="nf4", device_name="CPU: A", cpu_isa="avx2", batch_size=1,
                                    prefetch=0, standby_bytes=1e6, peak_bytes=2e6, repeats=5, busy="False",
                                    commit="abc"), **row})


def test_cpu_read_block_sets_the_map_path_beside_the_copy_path(tmp_path):
    _cpu_read_csv(tmp_path / "cpu_read.csv", [
        dict(cpu_read="copy", decode_tok_s=8.3, baseline_decode_tok_s=10.0, decode_ratio=0.83, rss_anon_bytes=60e6,
             peak_rss_anon_bytes=70e6),
        dict(cpu_read="map", decode_tok_s=9.9, baseline_decode_tok_s=10.0, decode_ratio=0.99, rss_anon_bytes=50e6,
             peak_rss_anon_bytes=52e6, paired_ratio_median=0.98, paired_ratio_q1=0.96, paired_ratio_q3=1.01),
        dict(cpu_read="map", batch_size=16, decode_tok_s=1.0, baseline_decode_tok_s=1.0, decode_ratio=1.0),  # no pair
        dict(cpu_read="copy", decode_ratio=0.1, busy="True"),  # a busy row is left out
    ])
    assert streaming.cpu_read_answers(tmp_path) == [
        "m nf4, batch 1, prefetch 0 (CPU: A (avx2)): stream decodes at 0.83x the resident model when it copies, "
        "0.99x when it maps (per pair, mapping: median 0.980x (0.960-1.010)); idle anonymous RSS 60.0 MB copying, 50.0 MB mapping, while decoding at most 70.0 and "
        "52.0 MB."]
    table = streaming.cpu_read_section(tmp_path)
    assert "| CPU: A (avx2) | m | nf4 | 1 | 0 | map | 9.9 | 10.0 | 0.990x | 0.980x (0.960-1.010) | 50.0 | 52.0 |" in table
    assert "| CPU: A (avx2) | m | nf4 | 1 | 0 | copy | 8.3 | 10.0 | 0.830x |  | 60.0 |" in table  # no pairs: blank
    assert "0.100x" not in table


def test_cpu_read_headline_is_one_line_over_every_pair(tmp_path):
    _cpu_read_csv(tmp_path / "cpu_read.csv", [
        dict(cpu_read="copy", decode_ratio=0.83, rss_anon_bytes=60e6, peak_rss_anon_bytes=70e6),
        dict(cpu_read="map", decode_ratio=0.99, rss_anon_bytes=50e6, peak_rss_anon_bytes=52e6),
        dict(cpu_read="copy", batch_size=16, decode_ratio=0.9, rss_anon_bytes=60e6, peak_rss_anon_bytes=90e6),
        dict(cpu_read="map", batch_size=16, decode_ratio=1.05, rss_anon_bytes=50e6, peak_rss_anon_bytes=51e6),
        dict(cpu_read="map", prefetch=2, decode_ratio=2.0),  # no pair: left out
    ])
    assert streaming.cpu_read_line(tmp_path) == (
        "2 configurations measured both ways (CPU: A (avx2)): stream decodes at 0.99x to 1.05x the resident model's "
        "speed when it maps each layer file, 0.83x to 0.90x when it copies it; while decoding, anonymous memory grows "
        "by at most 2.0 MB mapping, 30.0 MB copying.")
    assert streaming.cpu_read_line(tmp_path / "none") is None


def test_rows_from_before_the_flag_copied():
    assert streaming.read_way({"cpu_read": ""}) == streaming.read_way({}) == "copy"
    assert streaming.read_way({"cpu_read": "map"}) == "map"


def test_peer_runs_are_told_apart_by_how_the_stream_read():
    rows = [dict(run_id="a", model="m", quant="bf16", system="stream", note="offload-skip stream residency, prefetch 0",
                 device_name="CPU: A", cpu_isa="avx2"),
            dict(run_id="b", model="m", quant="bf16", system="stream", note="prefetch 0, layers read",
                 device_name="CPU: A", cpu_isa="avx2"),
            dict(run_id="c", model="m", quant="bf16", system="stream", note="prefetch 0, layers mapped",
                 device_name="CPU: A", cpu_isa="avx2")]
    # a run from before --cpu-read copied, so the newer copy run replaces it; the mapped run stands beside
    assert [run[0]["run_id"] for run in streaming.latest_peer_runs(rows)] == ["b", "c"]
    assert [streaming.peer_read_way([r]) for r in rows] == ["copy", "copy", "map"]
