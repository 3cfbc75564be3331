# imgsync worker image, one for CPU and GPU hosts. The default TORCH installs PyPI's torch, whose
# x86_64 wheels bring the CUDA libraries (several GB): the image runs on CPU, and on CUDA when a GPU is
# passed in. For a smaller CPU-only image install the CPU build instead, e.g.
#   docker build --build-arg TORCH="torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu" .
FROM python:3.11-slim AS base

ARG TORCH="torch==2.14.1 torchvision==0.29.1"
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    HF_HOME=/models IMGSYNC_HOME=/data

RUN useradd --create-home --uid 10001 imgsync \
 && mkdir -p /models /data && chown imgsync:imgsync /models /data
WORKDIR /app
# versions are pinned by the TORCH build argument
# hadolint ignore=DL3013
RUN pip install ${TORCH}
COPY pyproject.toml README.md ./
COPY config ./config
COPY schemas ./schemas
COPY migrations ./migrations
COPY tasks ./tasks
COPY worker ./worker
# the project itself, with its GPU extra (NVML binding); versions are pinned in pyproject.toml
# hadolint ignore=DL3013
RUN pip install ".[gpu]"

USER 10001
VOLUME ["/models", "/data"]
ENTRYPOINT ["imgsync"]
CMD ["--help"]
