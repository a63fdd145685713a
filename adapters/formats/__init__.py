"""The adapter file format (``io``: safetensors plus a JSON sidecar) and a ``TaloraModel`` to and from it."""
