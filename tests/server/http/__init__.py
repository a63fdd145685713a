"""Tests of talora.server.http: routes, schemas, limits, deadlines, robustness and fuzzing over HTTP."""
