"""Converters from other mail servers' configuration to a gateway policy.

:mod:`gateway.migrate.qmail` reads a qmail control directory (``gateway import-qmail``).
"""
