"""Tests of talora.server: a fast tier on a tiny random model, real-model tests marked slow, Ray ones marked ray."""
