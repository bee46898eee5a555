FROM python:3.12-slim

# It listens on every address; identity claims are accepted from its own pod or host only
# (docs/trust.md). Set SIDECAR_TRUSTED_NETWORKS to your gateway's network, or SIDECAR_TRUST=keys
# with [[api_keys]] may_assert, for claims from elsewhere.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    SIDECAR_HOST=0.0.0.0 SIDECAR_PORT=8080 SIDECAR_DATA_DIR=/data \
    SIDECAR_TRUSTED_NETWORKS=127.0.0.0/8,::1/128

RUN useradd --system --uid 10001 --home-dir /data --create-home sidecar
WORKDIR /app
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
# --build-arg EXTRAS=otel adds OpenTelemetry for [telemetry].
ARG EXTRAS=""
RUN pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}" && rm -rf /root/.cache

USER sidecar
VOLUME ["/data"]
EXPOSE 8080
# SIDECAR_REDIS_URL points at the Redis (or cluster / sentinel) the sidecars share;
# without it the embedded store runs inside the container, under /data.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"
ENTRYPOINT ["sidecar"]
CMD ["serve"]
