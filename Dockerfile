# syntax=docker/dockerfile:1
#
# One image for every drover role: the producer CLI, the per-hypervisor worker and Flower.
# Its entrypoint is the `drover` console script:
#   docker build -t drover .
#   docker run --rm drover --help
#   docker run --rm -e DROVER_FLOWER_AUTH=user:pass drover flower --address 0.0.0.0   (Flower)
# docker-compose.yml beside this file wires the roles together.
#
# Two stages: libvirt-python 9.0.0 has no wheel and compiles against Debian 12's
# libvirt 9.0, so the compiler and headers live only in the build stage; the runtime
# stage gets the libvirt shared library, virsh for debugging, and the finished venv.

FROM python:3.11-slim-bookworm AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

# libc6-dev is only a Recommends of gcc, so --no-install-recommends needs it named.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev pkg-config libvirt-dev \
 && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/drover
ENV PATH=/opt/drover/bin:$PATH

WORKDIR /src

# Locked dependencies first, in their own layer: it is rebuilt only when the lock changes.
COPY requirements.lock ./
RUN pip install -r requirements.lock

# Then the project itself, without touching the locked set. The packages are named
# one by one so that the context's .venv, .git and .cache never reach the image.
COPY pyproject.toml ./
COPY config ./config
COPY worker ./worker
COPY producer ./producer
COPY jobs ./jobs
COPY schedules ./schedules
COPY cli ./cli
COPY lab ./lab
RUN pip install --no-deps .


FROM python:3.11-slim-bookworm

# libvirt0: the library libvirt-python links against; libvirt-clients: virsh, for
# `docker compose exec worker virsh -c qemu:///system list` when something goes wrong.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libvirt0 libvirt-clients \
 && rm -rf /var/lib/apt/lists/*

COPY --from=build /opt/drover /opt/drover

ENV PATH=/opt/drover/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LIBVIRT_DEFAULT_URI=qemu:///system \
    DROVER_CONFIG=/etc/drover/drover.toml

# The import fails the build if the compiled binding does not load against this
# stage's libvirt0. Producer and Flower run as the unprivileged user; the worker
# overrides it with `user: root` in docker-compose.yml, since libvirtd's read-write
# socket admits root (and the host's libvirt group) only.
RUN python -c "import libvirt; print('libvirt', libvirt.getVersion())" \
 && groupadd --system --gid 10001 drover \
 && useradd --system --uid 10001 --gid drover --home-dir /var/lib/drover --create-home drover
USER 10001:10001
WORKDIR /var/lib/drover

ENTRYPOINT ["drover"]
CMD ["--help"]
