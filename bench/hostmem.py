"""The process's anonymous resident memory (host RAM its own allocations hold), and its peak
over a block of code, sampled: a measured counterpart to the counted weight bytes; and the
resident set split into anonymous and file-backed pages.

Anonymous = resident minus file-backed pages (/proc/self/statm: resident - shared), so a
checkpoint read through mmap, whose pages the kernel may drop at will, is not counted; what
from_pretrained and the quantiser allocate is. Linux only (None elsewhere).
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

_STATM = Path("/proc/self/statm")
_STATUS = Path("/proc/self/status")
SAMPLE_INTERVAL_S = 0.002


def anon_rss_bytes() -> int | None:
    """Resident anonymous bytes of this process now; None where /proc/self/statm is missing."""
    try:
        fields = _STATM.read_text().split()
    except OSError:
        return None
    return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")


def rss_split_bytes() -> tuple[int | None, int | None]:
    """(anonymous, file-backed) resident bytes of this process now: /proc/self/status RssAnon
    and RssFile (Linux 4.5+). File-backed pages (libraries, mapped layer files) are clean
    copies of a file the kernel may drop under memory pressure and read again; anonymous
    ones are not. With RssShmem (shared memory) they make up VmRSS. (None, None) where
    /proc/self/status or those lines are missing."""
    try:
        text = _STATUS.read_text()
    except OSError:
        return None, None
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def kib(name: str) -> int | None:
        value = fields.get(name, "").split()
        return int(value[0]) * 1024 if value else None  # "RssAnon:   123456 kB"
    return kib("RssAnon"), kib("RssFile")


class AnonPeak:
    """``with AnonPeak() as peak: ...`` then ``peak.bytes``: the most anonymous resident bytes
    seen, sampled every SAMPLE_INTERVAL_S by a thread (a spike shorter than that can be
    missed) and at entry and exit; None off Linux."""

    def __init__(self, interval_s: float = SAMPLE_INTERVAL_S):
        self.interval_s = interval_s
        self.bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        now = anon_rss_bytes()
        if now is not None:
            self.bytes = now if self.bytes is None else max(self.bytes, now)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "AnonPeak":
        self._sample()
        if self.bytes is not None:
            self._thread = threading.Thread(target=self._run, name="anon-peak", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
