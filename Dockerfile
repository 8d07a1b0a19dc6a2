# The one image every backstop process runs from (see docker-compose.yml and the Procfile).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BACKSTOP_VAR_DIR=/app/var

WORKDIR /app
COPY pyproject.toml README.md ./
COPY config ./config
COPY workers ./workers
COPY tasks ./tasks
COPY Procfile ./
RUN pip install -e . \
 && useradd --system --uid 1000 --home-dir /app backstop \
 && mkdir -p /app/var && chown backstop /app/var

# Celery refuses nothing as root, but a worker that runs untrusted payloads should not be root.
USER backstop
