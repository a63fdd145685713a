"""Other engines behind the same API, each through ``talora.server.facade``: vLLM, Ray Serve replicas."""
