"""Serving crack maps over HTTP: OGC API Features, vector tiles and a web map (``crackmap serve``).

Imported only by the ``serve`` command: FastAPI, tipg and uvicorn load with it, not with ``pipeline``.
"""
