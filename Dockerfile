# The one image every backstop process runs from (see docker-compose.yml and the Procfile).

# Stage 1: the wheel, built from the sources alone, so the image runs what `pip install` of a
# release gives (the migrations are package data), never a checkout.
FROM python:3.11-slim AS wheel
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY config ./config
COPY workers ./workers
COPY tasks ./tasks
RUN pip wheel --no-deps --wheel-dir /dist .

# Stage 2: production's lock (no demo or test extras), every file hash-checked and nothing
# resolved at build time, so a build does not drift with the day it runs; then the wheel,
# non-editable and with no dependencies of its own: `pip check` fails the build when the lock
# does not satisfy what the wheel asks for.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BACKSTOP_VAR_DIR=/app/var
COPY requirements/production.txt /tmp/production.txt
RUN pip install --require-hashes --no-deps -r /tmp/production.txt
COPY --from=wheel /dist/ /tmp/dist/
RUN pip install --no-deps /tmp/dist/*.whl \
 && pip check \
 && rm -r /tmp/dist /tmp/production.txt \
 && useradd --system --uid 1000 --home-dir /app backstop \
 && mkdir -p /app/var && chown backstop /app/var

WORKDIR /app
# Celery refuses nothing as root, but a worker that runs untrusted payloads should not be root.
USER backstop
