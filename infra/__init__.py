"""Deployment and local-development helpers (not part of the installed package)."""
