"""Tests of talora.adapters.formats: the adapter file format and the packaged demo bundle."""
