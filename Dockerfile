# syntax=docker/dockerfile:1
# offset-cir search service: `offset serve` over a mounted index (see docs/deploy.md).
#
#   docker build -t offset-cir .                                # CPU (torch CPU wheels), the default
#   docker build -t offset-cir:cuda --build-arg VARIANT=cuda .  # CUDA (torch wheels with their CUDA libraries)
#   docker run --rm -p 8000:8000 -v "$PWD/runs/idx:/index:ro" -v "$PWD/runs/ckpt:/ckpt:ro" \
#       offset-cir --index /index --checkpoint /ckpt
#   docker run --rm -p 8000:8000 -v "$PWD/runs/idx:/index:ro" -v "$PWD/runs/onnx:/onnx:ro" \
#       offset-cir --index /index --runtime onnx --onnx /onnx        # onnxruntime: no checkpoint needed
#
# Build arguments: VARIANT (cpu | cuda), EXTRAS (pip extras; add "pretrained" for the efficientnet-lite0-minilm
# backbone, "segment" for the mask pipeline), PYTHON_IMAGE (the base image), TORCH_CPU_INDEX (where CPU wheels of
# torch come from).
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG VARIANT=cpu
ARG EXTRAS=search,export
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# the versions pyproject.toml pins (pip refuses the install below if they ever disagree)
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, in its own layer: the largest download, unchanged by edits to the package
RUN if [ "$VARIANT" = "cpu" ]; then \
        pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" --index-url "$TORCH_CPU_INDEX"; \
    elif [ "$VARIANT" = "cuda" ]; then \
        pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"; \
    else \
        echo "VARIANT must be cpu or cuda, got $VARIANT" >&2; exit 1; \
    fi
WORKDIR /src
COPY pyproject.toml README.md LICENSE NOTICE ./
COPY offset_cir ./offset_cir
# the package itself; every dependency is pinned in pyproject.toml
# hadolint ignore=DL3013
RUN pip install ".[${EXTRAS}]" && offset info > /dev/null

FROM ${PYTHON_IMAGE}
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="offset-cir" \
      org.opencontainers.image.description="OFFSET composed image retrieval: search service over a mounted index" \
      org.opencontainers.image.licenses="Apache-2.0" \
      offset-cir.variant="${VARIANT}"
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/tmp/hf \
    MPLCONFIGDIR=/tmp/matplotlib \
    TORCH_HOME=/tmp/torch
RUN groupadd --system --gid 10001 offset \
    && useradd --system --uid 10001 --gid offset --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin offset
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000
# The index (and a checkpoint or an ONNX export) are mounted read-only; the service never writes to them.
# `offset serve` binds loopback by default: inside a container it must bind 0.0.0.0 for the published port to
# reach it. Clients may use localhost/127.0.0.1 in the Host header; any other name needs --allowed-host NAME.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["offset", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--index", "/index"]
