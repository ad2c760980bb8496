# syntax=docker/dockerfile:1
# The serving image: `slidr worker`, `slidr monitor`, `slidr produce`, `slidr replay`.
# slidr without its `train` extra (no torch, scipy, cvxpy, matplotlib) and with the CPU
# build of ONNX Runtime: the worker scores a small MLP on CPU (FINDINGS.md: 0.28 µs a row
# at batch 512), so the CUDA build's few hundred MB buy nothing. Build with
# --build-arg ONNXRUNTIME=onnxruntime-gpu for GPU nodes.
#
#   docker build -f deploy/docker/worker.Dockerfile -t slidr-worker .   # from the repo root
ARG PYTHON=3.11

FROM python:${PYTHON}-slim AS wheels
ARG ONNXRUNTIME=onnxruntime
WORKDIR /src
COPY pyproject.toml README.md ./
COPY events events
COPY features features
COPY data data
COPY models models
COPY stream stream
COPY lifecycle lifecycle
COPY slidr slidr
# pyproject.toml names onnxruntime-gpu; the image takes ${ONNXRUNTIME} in its place
# (both install the same `onnxruntime` module), then slidr itself without dependencies.
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d.replace('onnxruntime-gpu', '${ONNXRUNTIME}') for d in deps))" > requirements.txt \
 && pip wheel --no-cache-dir --wheel-dir /wheels -r requirements.txt \
 && pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:${PYTHON}-slim
COPY --from=wheels /wheels /wheels
RUN pip install --no-cache-dir --no-index /wheels/*.whl && rm -rf /wheels \
 && useradd --uid 10001 --create-home slidr \
 && mkdir -p /var/lib/slidr /srv/slidr/registry \
 && chown slidr:slidr /var/lib/slidr /srv/slidr/registry
USER 10001
# State (RocksDB per partition) under SLIDR_HOME; the metrics and health endpoints open to
# the pod network (loopback would hide them from Prometheus and the kubelet's probes).
ENV SLIDR_HOME=/var/lib/slidr \
    SLIDR_REGISTRY=/srv/slidr/registry \
    SLIDR_METRICS_PORT=9100 \
    SLIDR_METRICS_HOST=0.0.0.0 \
    PYTHONUNBUFFERED=1
EXPOSE 9100
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9100/healthz', timeout=2)"
ENTRYPOINT ["slidr"]
CMD ["worker"]
