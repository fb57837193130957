"""flax_warmstart's internals; the public API is what `flax_warmstart/__init__.py` re-exports."""
