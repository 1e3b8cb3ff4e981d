"""Can this machine run the repo? The versions of torch and transformers against the repo's
floor (FLOORS, the one place it is stated), whether bitsandbytes is there (NF4), and with
--device cuda whether torch sees a GPU. Reads package metadata before importing anything, so
a too-old or missing package is named in one line instead of failing an import somewhere.

    python check_env.py                 # versions only
    python check_env.py --device cuda   # and the GPU (gpu_check.sh runs this first)
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path

# The oldest versions the repo is run with; requirements.txt pins what results/ was measured with.
FLOORS = {"torch": "2.4", "transformers": "5.0"}


class EnvError(Exception):
    """What keeps this machine from running the repo, in one line."""


def release(version: str) -> tuple[int, ...]:
    """The release numbers of a version string: '2.11.0+cu130' -> (2, 11, 0), '5.0.0rc1' -> (5, 0, 0)."""
    match = re.match(r"\d+(\.\d+)*", version)
    if match is None:
        raise EnvError(f"cannot read the version {version!r}")
    return tuple(int(part) for part in match.group().split("."))


def meets(version: str, floor: str) -> bool:
    """Whether `version` is at least `floor`, number by number (a pre-release counts as its release)."""
    have, need = release(version), release(floor)
    width = max(len(have), len(need))
    return have + (0,) * (width - len(have)) >= need + (0,) * (width - len(need))


def check_versions(floors: dict[str, str] = FLOORS) -> list[str]:
    """A line per package that meets its floor; EnvError for the first that is missing or older."""
    lines = []
    for package, floor in floors.items():
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            raise EnvError(f"{package} is not installed (this repo needs {package} >= {floor})") from None
        if not meets(version, floor):
            raise EnvError(f"{package} {version} is older than this repo's floor {floor}")
        lines.append(f"{package} {version} (floor {floor}): ok")
    return lines


def nf4_line() -> str:
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes: not installed, NF4 cannot run (gpu_check.sh installs it from wheels/ if a wheel is there)"
    return f"bitsandbytes {importlib.metadata.version('bitsandbytes')}: NF4 available"


def cuda_line() -> str:
    import torch

    if not torch.cuda.is_available():
        raise EnvError("torch sees no CUDA device (torch.cuda.is_available() is False; a CPU build of torch?)")
    return f"GPU: {torch.cuda.get_device_name()} | torch {torch.__version__} | CUDA {torch.version.cuda}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: also check for a GPU")
    args = parser.parse_args(argv)
    try:
        lines = [*check_versions(), nf4_line()]
        if args.device == "cuda":
            lines.append(cuda_line())
    except EnvError as err:
        parser.error(str(err))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
