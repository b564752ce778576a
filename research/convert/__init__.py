"""Converters from reference implementations' weights to transferlab variables."""
