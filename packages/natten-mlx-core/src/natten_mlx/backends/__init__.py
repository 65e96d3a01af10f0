"""Backends that ship with the core: the pure backend."""
