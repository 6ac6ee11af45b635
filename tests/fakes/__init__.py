"""Fakes that are real servers speaking the real protocol on 127.0.0.1."""
