"""Signed bundles: manifest model, verification, safe archives, the content-addressed store."""
