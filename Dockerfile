# syntax=docker/dockerfile:1
# The peerstar image: `peerstar registry serve`, `peerstar snapshotter serve` (FUSE) and the
# CLI, including `peerstar k8s kubo-config`, the init step of the pods in
# deploy/kubernetes. Build from the repository root:
#   docker build -t peerstar:0.1.0 .
# Debian (bookworm) base: the same distribution the project is developed and tested on.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- build: wheels for peerstar and every dependency (pyfuse3 compiles against libfuse3) --
FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev pkg-config libfuse3-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY peerstar ./peerstar
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[fuse,grpc]'

# -- runtime: no compiler, only the FUSE runtime (fusermount3, libfuse3) and tini --
FROM ${PYTHON_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends fuse3 libfuse3-3 tini ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels 'peerstar[fuse,grpc]' \
 && rm -rf /wheels \
 && peerstar --help >/dev/null
# tini as PID 1 forwards SIGTERM to peerstar (Python as PID 1 would ignore it) and reaps
# children; the manifests pass the peerstar command as `args` so this entrypoint stays.
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["peerstar", "--help"]
# The registry's port (bound to the node's 127.0.0.1 by the DaemonSet's hostPort).
EXPOSE 5050
