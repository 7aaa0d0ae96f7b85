# syntax=docker/dockerfile:1
# The cluster image (docs/clusters.md "Docker"). Targets:
#   runtime (default)  train.py as the entry point, as a non-root user
#   test               runtime + the test tools (pytest, hadolint, lm_eval), runs the suite
# DEVICE=gpu (default): CUDA 13.0 devel base, because torch 2.13.0's PyPI wheel is built for
# CUDA 13 (its metadata requires cuda-toolkit 13.0.x; tests/test_dockerfile.py checks that the
# majors agree). nvcc 13 compiles DeepSpeed's ops and mamba-ssm against that torch; the host
# needs an NVIDIA driver >= 580. DEVICE=cpu: plain Ubuntu and torch's CPU wheel.
#
# Bases are pinned by digest (the multi-arch index). The digests were read from public
# Dockerfiles, not from the registry (no registry access where this was written); refresh
# with `docker buildx imagetools inspect nvidia/cuda:13.0.1-cudnn-devel-ubuntu24.04`.
ARG CUDA_BASE=nvidia/cuda:13.0.1-cudnn-devel-ubuntu24.04@sha256:8b2705ea7a8653ad3451b46ab835eced92d77b44e671b9cf3ad4f95fbb2efe5e
ARG CPU_BASE=ubuntu:24.04@sha256:c4a8d5503dfb2a3eb8ab5f807da5bc69a85730fb49b5cfca2330194ebcc41c7b
ARG DEVICE=gpu

FROM ${CUDA_BASE} AS base-gpu
FROM ${CPU_BASE} AS base-cpu

# base-gpu or base-cpu: a stage of this file, whose image is pinned above by digest.
# hadolint ignore=DL3006
FROM base-${DEVICE} AS deps
ARG DEVICE
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# openssh-client and pdsh: how launch/torchrun_hosts.sh and the deepspeed launcher
# (launch/deepspeed_hostfile.sh) reach the other hosts.
# The base digest fixes the Ubuntu release; apt versions follow that release's updates
# (Ubuntu drops superseded versions from its archive, so exact pins would stop building).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev python3-venv git \
       openssh-client pdsh \
    && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
RUN python3 -m venv /opt/venv
WORKDIR /opt/fbi
COPY requirements.txt requirements-gpu.txt requirements-mamba.txt ./

# 1. torch first (and the build tools), so that what compiles against it can see it. The CPU
#    image takes the +cpu build of the same version from PyTorch's index.
RUN if [ "$DEVICE" = cpu ]; then export PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu; fi; \
    pip install -c requirements-gpu.txt torch setuptools packaging ninja psutil py-cpuinfo

# 2. DeepSpeed 0.19.8 is an sdist without pyproject: without --no-build-isolation pip builds
#    it in an environment without torch and no op can be compiled. Prebuilt for GPUs: fused
#    Adam and the flatten utilities ZeRO uses (CUDA code, TORCH_CUDA_ARCH_LIST: A100, H100,
#    B200). Not prebuilt: CPU Adam (the offload configs) and every other op built by
#    DeepSpeed's CPUOpBuilder, which compiles with -march=native and the build host's SIMD
#    width (no switch turns that off), so a node with an older CPU would die with SIGILL.
#    They compile on the node at first use (about a minute) into TORCH_EXTENSIONS_DIR.
#    DS_ACCELERATOR=cuda: a build machine has no GPU, and DeepSpeed would build for the CPU.
ARG TORCH_CUDA_ARCH_LIST="8.0;9.0;10.0"
ARG MAX_JOBS=8
RUN if [ "$DEVICE" = gpu ]; then \
        export DS_ACCELERATOR=cuda DS_BUILD_FUSED_ADAM=1 DS_BUILD_UTILS=1; fi; \
    TORCH_CUDA_ARCH_LIST="$TORCH_CUDA_ARCH_LIST" MAX_JOBS="$MAX_JOBS" \
        pip install --no-build-isolation -c requirements-gpu.txt deepspeed \
    && pip install -r requirements-gpu.txt \
    && if [ "$DEVICE" = gpu ]; then python -c "from deepspeed.git_version_info import \
         installed_ops as ops; missing = [op for op in ('fused_adam', 'utils') \
         if not ops.get(op)]; assert not missing, f'DeepSpeed ops not prebuilt: {missing}'"; fi

# 3. --build-arg WITH_MAMBA=1 (GPU only): the Mamba-2 CUDA kernels, compiled here (FORCE_BUILD:
#    no download of prebuilt wheels) with at most MAX_JOBS parallel nvcc jobs; each takes
#    several GB of memory, so lower MAX_JOBS on small build machines. Their setup.py files
#    pass their own -gencode list to nvcc, so torch ignores TORCH_CUDA_ARCH_LIST and there is
#    no switch to narrow it: the build compiles every architecture they list (docs/clusters.md
#    "Docker" gives the cost).
ARG WITH_MAMBA=0
RUN if [ "$WITH_MAMBA" = 1 ] && [ "$DEVICE" = gpu ]; then \
        MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE MAX_JOBS="$MAX_JOBS" \
        TORCH_CUDA_ARCH_LIST="$TORCH_CUDA_ARCH_LIST" \
        pip install --no-build-isolation -r requirements-mamba.txt; \
    fi

FROM deps AS app
# Every cache under /cache. The mount points are writable by any user (sticky, like /tmp):
# `docker run --user "$(id -u)"` and Apptainer (which runs as the caller) write there as well
# as the image's own user 1001, without chown-ing the host folders.
ENV FBI_CACHE=/cache \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    TORCH_EXTENSIONS_DIR=/cache/torch_extensions \
    TRITON_CACHE_DIR=/cache/triton \
    HF_HUB_OFFLINE=1
COPY . .
RUN useradd --create-home --uid 1001 --user-group fbi \
    && mkdir -p /runs /cache /data \
    && chmod 1777 /runs /cache /data
USER 1001:1001

FROM app AS test
USER 0
RUN pip install -r requirements.txt
USER 1001:1001
ENTRYPOINT ["python", "-m", "pytest"]
CMD ["-q"]

FROM app AS runtime
# Runs, the download/shard/extension cache, and teachers/corpora are mounted from outside.
# A host folder mounted over /runs keeps its host owner: run as that owner,
#   docker run --user "$(id -u):$(id -g)" -v /scratch/runs:/runs ...
# (train.py refuses a run_dir it cannot write at start, naming the owner and this fix).
VOLUME ["/runs", "/cache", "/data"]
ENTRYPOINT ["python", "train.py"]
CMD ["run_dir=/runs/default"]
