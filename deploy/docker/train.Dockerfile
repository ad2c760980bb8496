# syntax=docker/dockerfile:1
# The training image: `slidr retrain`, `slidr train`, `slidr simulate`, `slidr evaluate`,
# plus everything the worker image has. slidr with its `train` extra; torch comes from the
# CPU wheel index (training an MLP of this size takes minutes on CPU, and the CUDA build
# would add gigabytes). Build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
# (or another CUDA index) for GPU training nodes.
#
#   docker build -f deploy/docker/train.Dockerfile -t slidr-train .    # from the repo root
ARG PYTHON=3.11

FROM python:${PYTHON}-slim AS wheels
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY pyproject.toml README.md ./
COPY events events
COPY features features
COPY data data
COPY models models
COPY stream stream
COPY lifecycle lifecycle
COPY slidr slidr
RUN pip wheel --no-cache-dir --wheel-dir /wheels --extra-index-url "${TORCH_INDEX}" '.[train]'

FROM python:${PYTHON}-slim
COPY --from=wheels /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels 'slidr[train]' && rm -rf /wheels \
 && useradd --uid 10001 --create-home slidr \
 && mkdir -p /var/lib/slidr /srv/slidr/registry /srv/slidr/data \
 && chown slidr:slidr /var/lib/slidr /srv/slidr/registry /srv/slidr/data
USER 10001
ENV SLIDR_HOME=/var/lib/slidr \
    SLIDR_REGISTRY=/srv/slidr/registry \
    PYTHONUNBUFFERED=1
ENTRYPOINT ["slidr"]
CMD ["retrain", "--help"]
