"""Upstream adapters: how the gateway talks to the services behind it."""
