"""flax_warmstart's internals; the public API is what `flax_warmstart/__init__.py` re-exports."""

from flax_warmstart._src import logs as _logs  # noqa: F401 (first: imports Orbax without configuring the root logger)
