"""Tests of talora.server.engine: the engine, scheduling, fairness, overlapped steps, device sampling."""
