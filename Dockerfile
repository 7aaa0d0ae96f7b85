# The cluster image: a CUDA devel base (nvcc, so that DeepSpeed's ops and the optional
# mamba-ssm kernels compile), the project's pinned GPU requirements, a non-root user, and
# train.py as the entry point. README "Docker" says how to build it and run it on a cluster.
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The base image's tag pins the distribution; its package versions follow that tag.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev python3-venv git \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    FBI_CACHE=/cache \
    TORCH_EXTENSIONS_DIR=/cache/torch_extensions \
    HF_HUB_OFFLINE=1
RUN python3 -m venv /opt/venv

WORKDIR /opt/fbi
COPY requirements.txt requirements-gpu.txt requirements-mamba.txt ./
# DS_BUILD_OPS=0: DeepSpeed compiles its ops on first use for the GPU at hand (cached under
# /cache); --build-arg DS_BUILD_OPS=1 with TORCH_CUDA_ARCH_LIST compiles them into the image.
ARG DS_BUILD_OPS=0
ARG TORCH_CUDA_ARCH_LIST="8.0;9.0"
RUN DS_BUILD_OPS=$DS_BUILD_OPS TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST \
    pip install -r requirements-gpu.txt
# --build-arg WITH_MAMBA=1: the optional Mamba-2 CUDA kernels.
ARG WITH_MAMBA=0
RUN if [ "$WITH_MAMBA" = 1 ]; then \
        TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST pip install --no-build-isolation -r requirements-mamba.txt; \
    fi

COPY . .
RUN useradd --create-home --uid 1001 --user-group fbi \
    && mkdir -p /runs /cache /data \
    && chown fbi /runs /cache /data
USER 1001:1001
# Runs, the download/shard/extension cache, and teachers/corpora are mounted from outside.
VOLUME ["/runs", "/cache", "/data"]

ENTRYPOINT ["python", "train.py"]
CMD ["run_dir=/runs/default"]
