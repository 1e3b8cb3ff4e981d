"""bench.hostmem: the anonymous resident memory and its sampled peak over a block."""
import torch

from bench import hostmem


def test_the_peak_sees_an_allocation_freed_inside_the_block():
    before = hostmem.anon_rss_bytes()
    with hostmem.AnonPeak() as peak:
        block = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MiB, touched
        del block
    assert peak.bytes >= before + 64 * 2**20 - 8 * 2**20  # less the pages other code freed meanwhile
    assert hostmem.anon_rss_bytes() < peak.bytes


def test_a_file_mapping_is_not_anonymous(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\1" * (32 * 2**20))
    before = hostmem.anon_rss_bytes()
    mapped = torch.from_file(str(path), shared=True, size=32 * 2**20, dtype=torch.uint8)
    assert int(mapped.sum()) == 32 * 2**20  # every page read
    assert hostmem.anon_rss_bytes() - before < 8 * 2**20


def _shmem_bytes() -> int:
    """RssShmem: a file on tmpfs is shared memory, not file-backed."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssShmem:"))


def test_the_rss_splits_into_anonymous_and_file_backed_pages(tmp_path):
    import psutil
    shmem = _shmem_bytes()
    anon, file = hostmem.rss_split_bytes()
    rss = psutil.Process().memory_info().rss
    assert isinstance(anon, int) and isinstance(file, int) and anon > 0 and file > 0
    assert anon + file <= 1.1 * rss  # with shared memory they make up the RSS (read a moment apart)
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\1" * (32 * 2**20))
    mapped = torch.from_file(str(path), shared=True, size=32 * 2**20, dtype=torch.uint8)
    assert int(mapped.sum()) == 32 * 2**20  # every page read: file-backed, not anonymous
    anon_after, file_after = hostmem.rss_split_bytes()
    assert (file_after + _shmem_bytes()) - (file + shmem) > 24 * 2**20 and anon_after - anon < 8 * 2**20


def test_without_proc_it_is_none(monkeypatch, tmp_path):
    monkeypatch.setattr(hostmem, "_STATM", tmp_path / "missing")
    monkeypatch.setattr(hostmem, "_STATUS", tmp_path / "missing")
    assert hostmem.anon_rss_bytes() is None and hostmem.rss_split_bytes() == (None, None)
    with hostmem.AnonPeak() as peak:
        pass
    assert peak.bytes is None
