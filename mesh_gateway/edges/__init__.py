"""Front ends: the HTTP listener, the admin listener."""
