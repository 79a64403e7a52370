# pgveil container image: a PostgreSQL proxy that enforces data-protection policy.
#   docker build -t pgveil .
#   docker run -e PGVEIL_UPSTREAM=postgresql://pgveil_catalog:...@db:5432/app \
#              -e PGVEIL_HASH_KEY=... -v $PWD/policies/reviews.yaml:/etc/pgveil/policy/policy.yaml:ro \
#              -p 6432:6432 -p 9187:9187 pgveil
# Settings come from /etc/pgveil/config.yaml (deploy/config.yaml); PGVEIL_* variables override it.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: install pgveil and its dependencies into a self-contained virtualenv ---------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# a C compiler, for mypyc to compile the relay's hot path (setup.py); only in this stage
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/pgveil
WORKDIR /src
COPY pyproject.toml setup.py ./
COPY proxy ./proxy
RUN /opt/pgveil/bin/pip install . \
 && find /opt/pgveil -name '__pycache__' -prune -exec rm -rf {} +

# --- runtime: the virtualenv, a non-root user, nothing else --------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin pgveil
COPY --from=build /opt/pgveil /opt/pgveil
COPY deploy/config.yaml /etc/pgveil/config.yaml
ENV PATH=/opt/pgveil/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /tmp
# 6432: PostgreSQL clients; 9187: /metrics, /healthz, /readyz
EXPOSE 6432 9187
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9187/healthz', timeout=2)"]
ENTRYPOINT ["pgveil"]
CMD ["serve", "--config", "/etc/pgveil/config.yaml"]
