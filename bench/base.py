"""What every harness module shares: the one-line user error and where things live."""
from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_DIR / "results"


class UsageError(Exception):
    """Bad user input, missing package, unreachable package index, or unknown model/corpus.

    The message is a single line; scripts turn it into an argparse-style exit with status 2.
    """


def first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def default_cache_dir() -> Path:
    """``$OFFLOAD_SKIP_CACHE`` if set, else ``~/.cache/offload-skip``."""
    env = os.environ.get("OFFLOAD_SKIP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "offload-skip"


def temp_sibling(path: Path) -> Path:
    """A temporary name next to `path`: the same directory keeps the final os.replace atomic,
    the pid keeps concurrent runs apart, and unlike tempfile it respects the umask."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextlib.contextmanager
def ticking(bar, what: str, every_s: float = 2.0):
    """For a step that reports nothing while it runs (inside a library call): the bar's postfix
    says `what` and the seconds it has taken, refreshed every `every_s` from a thread that
    only sleeps in between, so a slow step never looks like a hang."""
    start, done = time.perf_counter(), threading.Event()

    def beat():
        while not done.wait(every_s):
            bar.set_postfix_str(f"{what}, {time.perf_counter() - start:.0f} s", refresh=True)

    bar.set_postfix_str(what, refresh=True)
    thread = threading.Thread(target=beat, name="progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
