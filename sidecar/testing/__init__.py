"""Real servers for tests and benchmarks: private redis-server processes (one server, a Cluster,
a Sentinel set) on loopback, and an ASGI app served by uvicorn inside the caller's event loop.

Nothing the sidecar runs imports this package; it is here so that the test suite and the
benchmark harness share one implementation.
"""
