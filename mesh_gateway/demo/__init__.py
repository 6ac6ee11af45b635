"""The demo: a small mTLS upstream and the one-command gateway that `make run` starts."""
