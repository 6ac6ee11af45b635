"""Discovery: where endpoints and routes come from (the static catalog file, Consul)."""
