"""One file per training stage plus the shared loop pieces."""
