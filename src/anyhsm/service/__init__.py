"""The signing service (``anyhsm serve``): an HTTP API over one open handle.

Needs the ``server`` extra (``pip install 'anyhsm[server]'``: aiohttp, prometheus-client).
This package imports neither until one of its modules is imported: ``import anyhsm`` and
``anyhsm --help`` never load them. See docs/service.md.

- :mod:`anyhsm.service.settings`: ``[service]`` as typed settings, the client list.
- :mod:`anyhsm.service.tokens`: client tokens and their salted hashes.
- :mod:`anyhsm.service.status`: the table from error class to HTTP status.
- :mod:`anyhsm.service.limits`: rate limits, the worker gate, idempotent results.
- :mod:`anyhsm.service.metrics`: the Prometheus metrics.
- :mod:`anyhsm.service.app`: the application (authentication, workers, errors, logs).
- :mod:`anyhsm.service.routes`: the endpoints, one operation each.
- :mod:`anyhsm.service.openapi`: the committed OpenAPI 3.1 document.
- :mod:`anyhsm.service.server`: ``anyhsm serve``: TLS, signals, graceful shutdown.
"""
