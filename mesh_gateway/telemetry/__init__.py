"""Tracing, metrics and access logs: what operators see of each request."""
