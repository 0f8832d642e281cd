# sipura-proxy: slim runtime image. Mirrors the README's install command (`pip install .`).
#
# Key ownership: the proxy runs as uid/gid 10001 (user "sipura"). Private files mounted
# into the container (line keys, CA keys, the admin token) must be mode 0600 and owned
# by that uid, or the proxy cannot read them (and refuses any it can read that group or
# others could too):  sudo chown 10001:10001 conf/*.mc conf/*.key conf/admin.token
#
# Relative paths in the config resolve against the config file's directory, so
#   docker run --rm --network host -v $PWD/conf:/conf sipura-proxy run --config /conf/proxy.toml
# finds conf/ca.pub and conf/*.mc as /conf/... .
#
# Two stages: the wheel is built where a compiler, libsrtp2 and OpenSSL's headers are
# (the compiled packet path, proxy.media._fastrelay: decision 63), and the runtime image
# gets only the wheel and the libsrtp2 runtime. The build fails if the compiled path did
# not build: an image is a production deployment, where the Python path (its fallback)
# would silently cost twice the CPU per packet.
FROM python:3.11-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev pkg-config libsrtp2-dev libssl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py MANIFEST.in README.md ./
COPY csrc ./csrc
COPY proxy ./proxy
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && python -c "import glob, sys, zipfile; names = zipfile.ZipFile(glob.glob('/wheels/*.whl')[0]).namelist(); sys.exit(not any('_fastrelay' in n for n in names))"

FROM python:3.11-slim

ARG SIPURA_UID=10001
RUN apt-get update && apt-get install -y --no-install-recommends libsrtp2-1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid "${SIPURA_UID}" sipura \
    && useradd --uid "${SIPURA_UID}" --gid sipura --create-home --shell /usr/sbin/nologin sipura
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-cache-dir /tmp/wheels/*.whl && rm -rf /tmp/wheels \
    && python -c "import uvloop, prometheus_client, h11; from proxy.media.packet_path import fast_path_unavailable as why; assert why() is None, why()"

# SIP inside and outside (UDP and TCP), the admin endpoint, and the default media range.
# With --network host (the README's command) these are documentation; with a bridge
# network publish the same ports (-p 5070:5070/udp ... -p 20000-29999:20000-29999/udp).
EXPOSE 5070/udp 5070/tcp 5080/udp 5080/tcp 5099/tcp 20000-29999/udp

USER sipura
WORKDIR /home/sipura
# /health is public (no token): 200 "ok", 503 while draining or with no live media
# worker. The admin endpoint must listen where this reaches it ([admin] listen, e.g.
# "127.0.0.1:5099"); override SIPURA_ADMIN if it listens elsewhere.
ENV SIPURA_ADMIN=127.0.0.1:5099
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD python -c "import os, urllib.request as r; r.urlopen('http://' + os.environ['SIPURA_ADMIN'] + '/health', timeout=2)" >/dev/null 2>&1 || exit 1
# docker stop sends SIGTERM: the proxy drains ([run] drain_s, default 30 s); give it
# longer than that: docker stop -t 40.
STOPSIGNAL SIGTERM
ENTRYPOINT ["sipura-proxy"]
CMD ["--help"]
