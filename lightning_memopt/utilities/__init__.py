"""utilities."""
