"""The cluster image: hadolint finds nothing, and the Dockerfile installs the project's pins."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from dockerfile_parse import DockerfileParser

from fbi_testing import REPO


def instructions() -> list[dict]:
    parser = DockerfileParser(path=str(REPO / "Dockerfile"))
    return [s for s in parser.structure if s["instruction"] != "COMMENT"]


def pins(path: Path) -> dict[str, str]:
    """``name -> version`` of a requirements file, following ``-r`` includes."""
    found: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            found.update(pins(path.parent / line[3:].strip()))
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.+\-]+)", line)
        assert m, f"{path.name}: {line!r} is not pinned with =="
        found[m.group(1).lower()] = m.group(2)
    return found


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    proc = subprocess.run([hadolint, "--format", "json", str(REPO / "Dockerfile")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, json.loads(proc.stdout or "[]") or proc.stderr


def test_the_image_installs_the_pinned_cpu_set_and_gpu_additions():
    steps = instructions()
    base = steps[0]
    assert base["instruction"] == "FROM"
    image, _, tag = base["value"].partition(":")
    assert image and re.search(r"\d+\.\d+", tag) and "latest" not in tag  # a pinned base
    copied = " ".join(s["value"] for s in steps if s["instruction"] == "COPY")
    installs = " ".join(s["value"] for s in steps if s["instruction"] == "RUN")
    for name in ("requirements.txt", "requirements-gpu.txt", "requirements-mamba.txt"):
        assert name in copied
    assert re.search(r"pip install -r requirements-gpu\.txt", installs)
    assert re.search(r"pip install --no-build-isolation -r requirements-mamba\.txt", installs)
    assert 'WITH_MAMBA" = 1' in installs  # the Mamba kernels stay optional

    cpu, gpu = pins(REPO / "requirements.txt"), pins(REPO / "requirements-gpu.txt")
    assert {k: gpu[k] for k in cpu} == cpu  # every CPU pin, at the same version
    assert gpu["torch"] == cpu["torch"] and "ninja" in gpu
    mamba = pins(REPO / "requirements-mamba.txt")
    assert "mamba-ssm" in mamba and not set(mamba) & set(cpu)


def test_non_root_user_entry_point_and_volumes():
    steps = instructions()
    users = [s["value"] for s in steps if s["instruction"] == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    entry = [json.loads(s["value"]) for s in steps if s["instruction"] == "ENTRYPOINT"]
    assert entry[-1] == ["python", "train.py"]
    volumes = json.loads([s["value"] for s in steps if s["instruction"] == "VOLUME"][-1])
    assert {"/runs", "/cache", "/data"} <= set(volumes)
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "runs/" in ignored
