# Nexus Data Service image: the gRPC server `nexus-data serve` on port 50051.
#
#   docker build -t nexus-data .
#   docker run -p 50051:50051 -v nexus-data:/data nexus-data
#
# generated/ (the protoc output) is committed and copied as is: the image does not run
# protos/generate.py, CI checks that generated/ matches protos/.

ARG PYTHON_IMAGE=python:3.11-slim

# ---- builder: install the project and its dependencies into a virtualenv -------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# Same path as in the final stage: a virtualenv is not relocatable.
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# Exactly what the wheel is built from (see [tool.setuptools] in pyproject.toml); README.md
# is the project's `readme`, which setuptools reads (the wildcard keeps the build going if
# it is ever missing: setuptools only warns then).
COPY pyproject.toml README*.md ./
COPY generated/ generated/
COPY service/ service/
COPY db/ db/
COPY migrations/ migrations/
# A regular (not editable) install: the venv holds everything, /src is not needed at run time.
# All dependencies ship manylinux wheels, so no compiler is needed. The import is a smoke test:
# the entry point's module and the generated stubs are in the venv (run from /, not from /src).
RUN pip install --upgrade pip \
 && pip install . \
 && cd / && python -c "import service.cli, nexus.identity.v1.identity_pb2_grpc, nexus.work.v1.work_pb2_grpc"

# ---- final: the venv on a clean slim image, run as a non-root user ---------------------------
FROM ${PYTHON_IMAGE}

# NEXUS_DATA_DIR is the volume: the SQLite file, the blob store (whichever database: files' bytes
# outlive the container) and the first admin key's file.
# MALLOC_ARENA_MAX=2: two glibc heaps instead of eight per core; after large requests the
# server's peak and remaining memory are lower (bench/README.md, rss_after_large.py).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MALLOC_ARENA_MAX=2 \
    NEXUS_PORT=50051 \
    NEXUS_DATA_DIR=/data

# Fixed numeric ids, so Kubernetes' runAsNonRoot can check them and volume ownership is stable.
RUN groupadd --system --gid 10001 nexus \
 && useradd --system --uid 10001 --gid nexus --create-home --home-dir /home/nexus \
        --shell /usr/sbin/nologin nexus \
 && mkdir /data \
 && chown nexus:nexus /data

COPY --from=builder /opt/venv /opt/venv

# Declared after the chown: a named volume is initialised from /data as it is here, owned by nexus.
VOLUME ["/data"]
WORKDIR /home/nexus
USER 10001:10001

EXPOSE 50051
# No HEALTHCHECK: Kubernetes probes the standard gRPC health service (grpc.health.v1).
ENTRYPOINT ["nexus-data"]
CMD ["serve"]
