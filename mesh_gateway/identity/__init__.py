"""Identity: the internal CA, SVID credentials and TLS contexts built from them."""
