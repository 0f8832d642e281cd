"""The admin endpoint: a small HTTP/1.1 server (``http``), the routes the proxy serves on
it (``routes``), and the Prometheus exporter behind ``GET /metrics`` (``exporter``)."""
