# sipura-proxy: slim runtime image. Mirrors the README's install command.
FROM python:3.11-slim

RUN useradd --create-home --uid 10001 sipura
WORKDIR /opt/sipura-proxy
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install --no-cache-dir '.[fast]'

USER sipura
WORKDIR /home/sipura
ENTRYPOINT ["sipura-proxy"]
CMD ["--help"]
