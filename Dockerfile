# Rapport gateway image: the WebSocket / HTTP server only. The model runs in a
# separate vLLM server (see docker-compose.yml), reached with
# `--engine remote --upstream http://vllm:8000`, so this image does not install vLLM.
FROM python:3.11-slim

# `make` drives the install exactly as `make run` does on a fresh machine.
RUN apt-get update \
    && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin rapport
WORKDIR /app
RUN chown rapport:rapport /app
USER rapport

# Only what the install and the server need (no local virtualenv, no tests).
# README* may be absent; the glob keeps the COPY valid either way.
COPY --chown=rapport:rapport pyproject.toml Makefile README* ./
COPY --chown=rapport:rapport scripts ./scripts
COPY --chown=rapport:rapport protocol ./protocol
COPY --chown=rapport:rapport server ./server
COPY --chown=rapport:rapport sessions ./sessions
COPY --chown=rapport:rapport clients ./clients
COPY --chown=rapport:rapport rapport ./rapport

# The same Makefile steps `make run` takes before it starts the server (run ->
# model -> vllm -> install): the virtualenv and the package. RAPPORT_SKIP_VLLM=1
# skips vLLM and the small CPU model, which the gateway does not use.
RUN RAPPORT_SKIP_VLLM=1 make model

ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    RAPPORT_HOST=0.0.0.0 \
    RAPPORT_PORT=8000

EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('RAPPORT_PORT', '8000'), timeout=4)"

ENTRYPOINT ["rapport", "serve"]
