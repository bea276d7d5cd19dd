"""The names a run config may use, each table registered by the module that implements it.

:mod:`fedmpi.config` checks a config's compressor, dataset, partition, model and SAM
estimator against these tables, and builds a compressor's own keys from its registered
class, without importing the implementing modules: they import config's dataclasses and
:class:`~fedmpi.errors.ConfigError`, so config importing them would be an import cycle.
Each provider fills its tables when it is imported (:func:`provide`):

==================  =============================================================
``compressors``     ``fedmpi.compress``: name -> compressor class (its ``Config``,
                    ``ef_default``, ``own_residual``)
``datasets``        ``fedmpi.data``: name -> dataset entry; ``partitions``,
                    ``augmentable``, ``dataset_info(data_cfg)`` (shape and classes)
``models``          ``fedmpi.models``: name -> factory; ``dense``,
                    ``model_fit_error(model_cfg, input_shape, num_classes)``
``estimators``      ``fedmpi.sam``: name -> estimator class
``algorithms``      ``fedmpi.algorithms``: name -> federated method (its ``Config``,
                    ``check(cfg)``, client and server halves)
==================  =============================================================

This module imports nothing from fedmpi. A lookup of a table no provider has filled yet
imports the providers by name (:data:`PROVIDERS`), so a process that imported only
fedmpi.config validates against every name (e.g. ``python -m fedmpi.config``). That is a
call-time dependency, not an import-time one: any fedmpi module can be imported first.
"""

from __future__ import annotations

import importlib
from typing import Any

#: the modules that fill the tables, imported on the first lookup of a missing table
PROVIDERS = ("fedmpi.compress", "fedmpi.data", "fedmpi.models", "fedmpi.sam",
             "fedmpi.algorithms")

#: every table a provider may fill
TABLES = ("compressors", "datasets", "partitions", "augmentable", "dataset_info", "models",
          "dense", "model_fit_error", "estimators", "algorithms")

_tables: dict[str, Any] = {}


def provide(**tables: Any) -> None:
    """Called by a provider at import: ``provide(models=MODELS, dense=DENSE, ...)``. The
    object itself is kept (not a copy), so the provider's later changes show."""
    unknown = sorted(set(tables) - set(TABLES))
    if unknown:
        raise KeyError(f"unknown registry tables {unknown}; known: {', '.join(TABLES)}")
    _tables.update(tables)


def lookup(table: str) -> Any:
    """The registered table (a dict of name -> implementation, a tuple of names, or a
    function), its providers imported first if none has registered it yet."""
    if table not in _tables:
        for module in PROVIDERS:
            importlib.import_module(module)
    try:
        return _tables[table]
    except KeyError:
        raise KeyError(f"no provider registered the table {table!r} "
                       f"(providers: {', '.join(PROVIDERS)})") from None
