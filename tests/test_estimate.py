"""The bandwidth model's formulas, in tables."""
import pytest

import estimate
from estimate import predict

LAYERS = {2: 100, 4: 100, 6: 100}  # bytes


@pytest.mark.parametrize("budget, storage, h2d, compute, serial, prefetched, streamed", [
    # CPU from RAM: nothing to read or copy at these rates -> all equal compute
    (0, None, None, 1.0, 1.0, 1.0, 300),
    # 300 B at 100 B/s storage: 3 s; the pipeline hides the smaller of compute and read
    (0, 100, None, 1.0, 4.0, 3.0, 300),
    (0, 100, None, 5.0, 8.0, 5.0, 300),
    # GPU: read and copy are separate stages; serial adds both, the pipeline takes the slowest
    (0, 100, 300, 1.0, 5.0, 3.0, 300),
    (0, 300, 100, 1.0, 5.0, 3.0, 300),
    # a budget keeps the first layers that fit: 250 B keeps two, one is streamed
    (250, 100, None, 0.5, 1.5, 1.0, 100),
    (10_000, 100, 100, 2.0, 2.0, 2.0, 0),
])
def test_predict(budget, storage, h2d, compute, serial, prefetched, streamed):
    p = predict(LAYERS, budget, compute, storage, h2d)
    assert p.streamed_bytes == streamed
    assert p.resident_s == p.session_s == compute
    assert p.stream_serial_s == pytest.approx(serial)
    assert p.stream_prefetch_s == pytest.approx(prefetched)


@pytest.mark.parametrize("storage, h2d, load_s", [(None, None, 0.0), (100, None, 3.0), (100, 300, 4.0)])
def test_session_load_reads_every_offloaded_layer_once(storage, h2d, load_s):
    assert predict(LAYERS, 0, 1.0, storage, h2d).session_load_s == pytest.approx(load_s)


@pytest.mark.parametrize("n_in, n_out, expected", [
    # 64 x 64 = 4096 params: 2048 B codes, 64 uint8 absmax, one fp32 nested absmax, tables, offset
    (64, 64, 2048 + 64 + 4 + 64 + 1024 + 4),
    (2048, 11008, 2048 * 11008 // 2 + 352_256 + 4 * 1376 + 64 + 1024 + 4),
])
def test_nf4_linear_bytes(n_in, n_out, expected):
    assert estimate.nf4_linear_bytes(n_in, n_out) == expected


def test_qwen25_3b_layer_bytes():
    """7 NF4 linears (q, k, v, o, gate, up, down) plus bf16 q/k/v biases and two bf16 norms."""
    linears = [(2048, 2048), (2048, 256), (2048, 256), (2048, 2048), (2048, 11008), (2048, 11008), (11008, 2048)]
    expected = sum(estimate.nf4_linear_bytes(a, b) for a, b in linears) + 2 * (2048 + 512) + 4 * 2048
    assert estimate.qwen_layer_nf4_bytes(hidden=2048, intermediate=11008, n_heads=16, n_kv_heads=2) == expected


# ---------------------------------------------------------------------------- speculative decoding

@pytest.mark.parametrize("drafted, accepted, t_draft, t_verify, expected", [
    (0, 1, 0.0, 0.1, 0.1),          # nothing drafted, one token per forward: the plain stream
    (0, 1, 5.0, 0.1, 0.1),          # an unused draft costs nothing
    (4, 3, 0.01, 0.2, 0.08),        # (4 x 0.01 + 0.2) / 3
    (2, 2, 0.05, 0.1, 0.1),         # two tokens per forward, paid for by the drafting: no gain
    (3, 2.5, 0.0, 0.5, 0.2),        # a free draft (lookup): the verify shared by 2.5 tokens
])
def test_speculative_s_per_token(drafted, accepted, t_draft, t_verify, expected):
    assert estimate.speculative_s_per_token(drafted, accepted, t_draft, t_verify) == pytest.approx(expected)


@pytest.mark.parametrize("drafted, t_draft, t_verify", [(0, 0.0, 0.1), (4, 0.01, 0.2), (8, 0.05, 1.0)])
def test_speculative_more_accepted_is_faster_more_drafted_is_slower(drafted, t_draft, t_verify):
    times = [estimate.speculative_s_per_token(drafted, a, t_draft, t_verify) for a in (1, 1.5, 2, 3, 5)]
    assert times == sorted(times, reverse=True) and len(set(times)) == len(times)
    if t_draft:
        assert estimate.speculative_s_per_token(drafted + 1, 2, t_draft, t_verify) > times[2]


REFERENCE = estimate.select_layers(36, "even")


@pytest.mark.parametrize("model, streamed, storage", [
    (estimate.QWEN25_3B, REFERENCE, None), (estimate.QWEN25_3B, REFERENCE, 7e9),
    (estimate.QWEN25_7B, list(range(22, 28)), 3.5e9), (estimate.QWEN25_14B, [], 7e9),
])
def test_predict_speculative_without_a_draft_is_the_stream_model(model, streamed, storage):
    p = estimate.predict_speculative(model, streamed, storage, 12e9, 1, 0, estimate.PLAIN)
    layer = estimate.layer_nf4_bytes(model)
    q = predict({i: layer for i in streamed}, 0, estimate.compute_s(model), storage, 12e9)
    assert (p.serial_s, p.prefetch_s, p.streamed_bytes) == (q.stream_serial_s, q.stream_prefetch_s, q.streamed_bytes)


def test_compute_is_the_3b_reference_measured_rate():
    assert estimate.compute_s(estimate.QWEN25_3B) == pytest.approx(1 / estimate.ORIGINAL["resident_tok_s"])
    # larger models read more bytes per token, so take longer
    assert (estimate.compute_s(estimate.QWEN25_3B) < estimate.compute_s(estimate.QWEN25_7B)
            < estimate.compute_s(estimate.QWEN25_14B))


M7 = estimate.QWEN25_7B
W7 = estimate.weights_read_bytes(M7)


@pytest.mark.parametrize("draft, streamed, card, read", [
    (estimate.PLAIN, 100, 0, 0),
    (estimate.Draft("lookup"), 100, 0, 0),
    (estimate.Draft("qwen2.5-coder-0.5b", 7e8), 100, 7e8, 7e8),          # a sibling: its own bytes
    (estimate.Draft("self:hqq3", 5e7, 0.5), 100, 50, W7 - 100 + 50),   # resident part + substitutes
])
def test_draft_bytes(draft, streamed, card, read):
    assert draft.card_bytes(streamed) == pytest.approx(card)
    assert draft.read_bytes(M7, streamed) == pytest.approx(read)


@pytest.mark.parametrize("draft_bytes, plain_read, quant, expected", [
    (70, 100, "nf4", 0.7),
    (50, 200, "bf16", 50 / 100 / estimate.BYTES_PER_PARAM["nf4"]),  # 100 params at 0.5 B each: NF4 size
    (0, 100, "nf4", None), (70, None, "nf4", None), (70, 100, "int3", None),
])
def test_substitute_ratio(draft_bytes, plain_read, quant, expected):
    got = estimate.substitute_ratio(draft_bytes, plain_read, quant)
    assert got == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize("model", [estimate.QWEN25_7B, estimate.QWEN25_14B])
@pytest.mark.parametrize("draft", [estimate.PLAIN, estimate.Draft("qwen2.5-coder-0.5b", 7e8),
                                   estimate.Draft("self:hqq3", 0, 0.1)])
def test_6gb_card_streams_the_fewest_last_layers_that_fit(model, draft):
    streamed = estimate.card_streamed_layers(model, draft=draft)
    n = model["n_layers"]
    assert streamed == list(range(n - len(streamed), n))
    assert estimate.card_bytes(model, len(streamed), draft) <= estimate.CARD_VRAM_BYTES
    if streamed:  # streaming one layer fewer would not fit
        assert estimate.card_bytes(model, len(streamed) - 1, draft) > estimate.CARD_VRAM_BYTES


def test_6gb_card_too_small():
    # substitutes as large as the layers they stand for save nothing; a 1 GB card holds nothing
    assert estimate.card_streamed_layers(estimate.QWEN25_14B, draft=estimate.Draft("self:nf4", 0, 1.0)) is None
    assert estimate.card_streamed_layers(estimate.QWEN25_7B, vram_bytes=2**30) is None


SPEC_COLUMNS = ("model,quant,draft,draft_bytes,prompt_kind,cold_reads,prefetch,busy,verify_forwards,new_tokens,"
                "accepted_per_verify,drafted_per_verify,plain_read_bytes_per_token,tokens_equal").split(",")


def write_spec_csv(path, rows):
    path.write_text("\n".join([",".join(SPEC_COLUMNS)] + [",".join(map(str, r)) for r in rows]) + "\n")


SPEC_ROWS = [
    ("m", "nf4", "lookup", 0, "wiki", False, 0, False, 10, 12, 1.2, 2, 1000, True),
    ("m", "nf4", "lookup", 0, "code", False, 0, False, 10, 20, 2.0, 3, 1000, True),
    ("m", "nf4", "lookup", 0, "code", True, 1, False, 30, 120, 4.0, 5, 1000, True),
    ("m", "nf4", "lookup", 0, "code", False, 0, True, 1000, 9000, 9.0, 9, 1000, True),   # busy: left out
    ("m", "nf4", "self:hqq3", 700, "code", False, 0, False, 10, 25, 2.5, 4, 1000, True),
]


def test_measured_acceptance_pools_non_busy_rows_code_first(tmp_path):
    write_spec_csv(tmp_path / "speculative.csv", SPEC_ROWS)
    got = estimate.measured_acceptance(estimate.bench.read_rows(tmp_path / "speculative.csv"))
    assert [(a.draft.name, a.prompt_kind, a.rows) for a in got] == [
        ("lookup", "code", 2), ("self:hqq3", "code", 1), ("lookup", "wiki", 1)]
    # weighted by verify forwards: (10 x 2 + 30 x 4) / 40, (10 x 3 + 30 x 5) / 40
    assert (got[0].accepted_per_verify, got[0].drafted_per_verify) == (pytest.approx(3.5), pytest.approx(4.5))
    assert got[1].draft.substitute_ratio == pytest.approx(0.7)


def test_measured_acceptance_leaves_adaptive_rows_out(tmp_path):
    """An adaptive row's plain steps are this CPU's timing choice, not what the draft accepts."""
    path = tmp_path / "speculative.csv"
    path.write_text("\n".join([",".join(SPEC_COLUMNS + ["schedule"])] + [
        ",".join(map(str, SPEC_ROWS[1] + (schedule,))) for schedule in ("adaptive", "constant", "")]) + "\n")
    (got,) = estimate.measured_acceptance(estimate.bench.read_rows(path))
    assert got.rows == 2


def test_speculative_table(tmp_path):
    write_spec_csv(tmp_path / "speculative.csv", SPEC_ROWS)
    lines = estimate.speculative_table(tmp_path).splitlines()
    rows = [line for line in lines if line.startswith("| ") and "---" not in line]
    assert [r.split(" | ")[0:2] for r in rows[1:]] == [
        ["| none (plain stream)", "-"], ["| lookup", "code"], ["| self:hqq3", "code"], ["| lookup", "wiki"]]
    assert all(r.count(" | ") == 7 for r in rows)
    # a free draft with a verify as costly as a token: x = accepted per verify on every setup
    assert rows[2].count("(3.50x)") == 4 and rows[4].count("(1.20x)") == 4


@pytest.mark.parametrize("rows, says", [(None, "is missing"), ([], "no non-busy rows"), (SPEC_ROWS[3:4], "no non-busy rows")])
def test_speculative_table_without_measurements_is_one_line(tmp_path, rows, says):
    if rows is not None:
        write_spec_csv(tmp_path / "speculative.csv", rows)
    text = estimate.speculative_table(tmp_path)
    assert "\n" not in text and says in text


def test_cli_prints_the_speculative_table_after_the_reference(tmp_path, capsys):
    estimate.main(["--speculative", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.index("| storage |") < out.index("No speculative predictions")


# --------------------------------------------------------------------------- larger than the device

def _large_rows(tmp_path, cold: bool):
    """A dummy 3B baseline (the machine's compute rate) and a 14B stream row, written to results/."""
    import bench
    from test_results import _row, _variant
    machine = dict(device_name="CPU: A", cpu_isa="avx2", weights="dummy", quant="nf4")
    three_b = estimate.weights_read_bytes(estimate.QWEN25_3B)
    bench.append_row(tmp_path / "baseline.csv", _row(**machine, model="dummy:qwen2.5-3b", decode_tok_s=0.5,
                                                     ppl=None))
    layers = " ".join(map(str, range(2, 45, 2)))
    bench.append_row(tmp_path / "large.csv", _variant(
        **machine, model="dummy:qwen2.5-14b", variant="diskoffload", mode="stream", prefetch=1, n_layers=48,
        layers_offloaded=layers, loads=22 * 4, loaded_bytes=22 * 4 * 100e6, per_layer_load_ms=50.0,
        cold_reads=cold, cold_read_bytes_s=1e9 if cold else None, prompt_tokens=12, max_new_tokens=4, batch_size=1,
        peak_bytes=5 * 2**30, baseline_decode_tok_s=0.1, decode_ms_per_tok=12_500.0, budget_bytes=0,
        load_peak_host_bytes=9e9, baseline_standby_bytes=9e9))
    return three_b


@pytest.mark.parametrize("cold, read_s", [(False, 22 * 0.05), (True, 22 * 100e6 / 1e9)])
def test_a_large_row_against_its_bound_and_the_3b_rows_compute_rate(cold, read_s, tmp_path):
    three_b = _large_rows(tmp_path, cold)
    reference = [r for name in ("baseline.csv",) for r in estimate.bench.read_rows(tmp_path / name)]
    (check,) = estimate.large_checks(estimate.bench.read_rows(tmp_path / estimate.LARGE_CSV), reference)
    assert check.compute_s == pytest.approx(10.0)  # the unpatched model's 0.1 tok/s in the same run
    assert check.read_s == pytest.approx(read_s)  # 22 layers of 100 MB: at 50 ms each, or at the cold 1 GB/s
    assert check.bound_s == pytest.approx(10.0) and check.measured_s == 12.5
    # 16 bf16 keys and values per layer: 48 layers x 8 heads x 128 x 2 x 2 bytes each
    assert check.device_bytes == 5 * 2**30 + 48 * 8 * 128 * 2 * 2 * 16
    # a priori: the 14B's weight bytes at the rate the 3B computed (0.5 tok/s), the reads overlapped
    compute_s = estimate.weights_read_bytes(estimate.QWEN25_14B) / (three_b * 0.5)
    assert check.a_priori_s == pytest.approx(max(compute_s, read_s))


def test_a_large_row_without_a_3b_row_on_its_machine_has_no_a_priori_prediction(tmp_path):
    _large_rows(tmp_path, cold=False)
    (check,) = estimate.large_checks(estimate.bench.read_rows(tmp_path / estimate.LARGE_CSV), [])
    assert check.a_priori_s is None


# --------------------------------------------------------------------------- --plan on a 6 GB card

@pytest.mark.parametrize("model", [estimate.QWEN25_3B, estimate.QWEN25_7B, estimate.QWEN25_14B])
@pytest.mark.parametrize("storage", list(estimate.PLAN_STORAGE))
def test_a_card_plan_fits_the_card_less_its_reserve(model, storage):
    plan = estimate.card_plan(model, estimate.PLAN_STORAGE[storage])
    assert plan.chosen.device_bytes <= estimate.CARD_VRAM_BYTES - estimate.VRAM_RESERVE_BYTES
    assert plan.chosen.kv_bytes == estimate.kv_cache_bytes(model, estimate.CONTEXT_TOKENS)
    assert plan.chosen.cpu_read is None and plan.rates.read_compute_share == 0.0  # a GPU: no CPU read paths


def test_the_3b_fits_whole_and_the_14b_streams():
    assert estimate.card_plan(estimate.QWEN25_3B, estimate.HOST_MEMORY_Bps).streamed == ()
    assert len(estimate.card_plan(estimate.QWEN25_14B, estimate.HOST_MEMORY_Bps).streamed) > 0


def test_cli_prints_the_plans(capsys):
    estimate.main(["--plan"])
    out = capsys.readouterr().out
    assert "Fit to a 6 GB card" in out and out.count("plan for 5.00 GiB") == 3 * len(estimate.PLAN_STORAGE)
