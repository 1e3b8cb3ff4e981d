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
