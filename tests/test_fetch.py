import io
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from fbi import fetch
from fbi.fetch import extract, pip_download

FILES = {
    "pkg/data/a_gut.txt": b"alpha\n",
    "pkg/data/b_gut_f.txt": b"folio\n",
    "pkg/data/sub/c_gut.txt": b"gamma\n",
    "pkg/__init__.py": b"",
    "pkg-1.0.dist-info/METADATA": b"Name: pkg\n",
}
WANTED = ["pkg/data/a_gut.txt", "pkg/data/sub/c_gut.txt"]


def make_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("pkg/data/", b"")
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def make_tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("pkg/data/link_gut.txt")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tf.addfile(link)
    return path


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name]


@pytest.fixture(params=["whl", "tar.gz"])
def archive(request, tmp_path) -> Path:
    if request.param == "whl":
        return make_zip(tmp_path / "pkg-1.0-py3-none-any.whl", FILES)
    return make_tar(tmp_path / "pkg-1.0.tar.gz", FILES)


def test_extract_keeps_only_matching_regular_files(archive, tmp_path):
    dest = tmp_path / "out"
    got = extract(archive, ["*/data/*_gut.txt"], dest)
    assert got == [dest / name for name in WANTED]
    assert [p.read_bytes() for p in got] == [FILES[name] for name in WANTED]
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == WANTED
    assert leftovers(tmp_path) == []


def test_extract_reuses_existing_folder_without_the_archive(archive, tmp_path):
    dest = tmp_path / "out"
    first = extract(archive, ["*/data/*_gut.txt"], dest)
    archive.unlink()
    assert extract(archive, ["*/data/*_gut.txt"], dest) == first


def test_extract_crash_leaves_no_folder(archive, tmp_path, monkeypatch):
    dest = tmp_path / "out"
    real_copy = shutil.copyfileobj
    calls = []

    def copy_then_crash(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        real_copy(*args, **kwargs)

    monkeypatch.setattr(fetch.shutil, "copyfileobj", copy_then_crash)
    with pytest.raises(OSError, match="disk full"):
        extract(archive, ["*/data/*_gut.txt"], dest)
    assert not dest.exists()
    assert leftovers(tmp_path) == []

    monkeypatch.setattr(fetch.shutil, "copyfileobj", real_copy)
    assert len(extract(archive, ["*/data/*_gut.txt"], dest)) == 2


def test_extract_no_match_names_the_patterns(archive, tmp_path):
    with pytest.raises(ValueError, match=r"matches members=\['nothing/\*'\]"):
        extract(archive, ["nothing/*"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_extract_refuses_member_outside_dest(tmp_path):
    archive = make_zip(tmp_path / "evil.zip", {"../evil.txt": b"x"})
    with pytest.raises(RuntimeError, match="outside the target folder"):
        extract(archive, ["*"], tmp_path / "sub" / "out")
    assert not (tmp_path / "sub" / "evil.txt").exists()
    assert not (tmp_path / "evil.txt").exists()


def test_pip_download_unknown_requirement_says_how_to_fix(tmp_path, monkeypatch):
    # Fail fast even without network: one attempt, short timeout.
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "5")
    requirement = "fbi-no-such-package-xyz==0.0.1"
    with pytest.raises(RuntimeError) as excinfo:
        pip_download(requirement, tmp_path)
    message = str(excinfo.value)
    assert requirement in message
    assert f"pip download --no-deps '{requirement}'" in message
    assert str(tmp_path / requirement) in message
    assert list(tmp_path.iterdir()) == []


def test_pip_download_reuses_archive_provided_by_hand(tmp_path, monkeypatch):
    requirement = "fbi-no-such-package-xyz==0.0.1"
    folder = tmp_path / requirement
    folder.mkdir()
    archive = make_tar(folder / "fbi-no-such-package-xyz-0.0.1.tar.gz", FILES)

    def no_network(*args, **kwargs):
        raise AssertionError("pip must not run when the archive is already there")

    monkeypatch.setattr(subprocess, "run", no_network)
    assert pip_download(requirement, tmp_path) == archive

    make_zip(folder / "other.whl", FILES)
    with pytest.raises(RuntimeError, match="exactly one archive"):
        pip_download(requirement, tmp_path)
