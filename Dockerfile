# postbote in a container: `postbote run` as an unprivileged user, the config and the state as volumes.
#   docker build -t postbote .
#   docker run -d --name postbote -v /etc/postbote:/etc/postbote:ro -v postbote-state:/var/lib/postbote postbote
# The config must say `state_dir: /var/lib/postbote`. See examples/container/compose.yaml and docs/service.md.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY agent ./agent
COPY plugins ./plugins
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && pip wheel --no-cache-dir --wheel-dir /wheels pluggy pyyaml schedule structlog

FROM python:3.11-slim
RUN useradd --system --uid 10025 --home-dir /var/lib/postbote --shell /usr/sbin/nologin postbote \
 && install -d -o postbote -g postbote -m 0700 /var/lib/postbote
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels postbote && rm -rf /wheels
USER postbote
VOLUME ["/var/lib/postbote"]
ENV POSTBOTE_CONFIG=/etc/postbote/postbote.yaml PYTHONUNBUFFERED=1
# Unhealthy while an account's last poll failed or mail waits undelivered: what `postbote status` exits 1 for.
HEALTHCHECK --interval=5m --timeout=30s --start-period=2m CMD ["postbote", "status"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["postbote"]
CMD ["run"]
