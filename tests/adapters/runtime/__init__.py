"""Tests of talora.adapters.runtime: batch metadata, label scores, decoding and decode graphs."""
