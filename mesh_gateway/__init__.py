"""mesh-gateway: a zero-trust edge gateway for a service mesh."""

__version__ = "0.1.0"
