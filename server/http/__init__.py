"""The HTTP layer: ``app.create_app``, routes, schemas, ``bridge`` (a request to jobs), limits, uvicorn."""
