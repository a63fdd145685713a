"""Tests of talora.server.backends: vLLM (against a fake server) and Ray Serve (Ray-free parts; -m ray)."""
