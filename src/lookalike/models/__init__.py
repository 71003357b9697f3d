"""Which model a home uses and loading it (layer L3: below catalog and the engine).

The engine asks `active_encoder(home, base)`; lookalike.tuning writes new versions and
switches between them. Inference only: torch is never imported here.
"""

from __future__ import annotations

from .registry import (
    ACTIVE_FILE,
    TUNED_DIR,
    active_encoder,
    active_version,
    describe_active,
    list_models,
    load_tuned,
    model_info,
    remove_model,
    set_active,
    tuned_root,
)
from .tuned import (
    HEAD_FORMAT,
    TRUNK_INPUT,
    FinetunedEncoder,
    Head,
    TunedEncoder,
    base_of,
    catalog_vectors,
    is_tuned,
    open_tuned,
)
from .views import (
    BASE_STAMP_META,
    CATALOG_VIEWS,
    DEFAULT_CATALOG_VIEWS,
    DEFAULT_POWER,
    TURNED_VIEWS,
    CatalogViewEncoder,
    catalog_power_for,
    catalog_views_for,
    parse_stamp,
    query_encoder,
    with_catalog_views,
)

__all__ = [
    "ACTIVE_FILE",
    "BASE_STAMP_META",
    "CATALOG_VIEWS",
    "DEFAULT_CATALOG_VIEWS",
    "DEFAULT_POWER",
    "TURNED_VIEWS",
    "CatalogViewEncoder",
    "catalog_power_for",
    "catalog_views_for",
    "parse_stamp",
    "query_encoder",
    "with_catalog_views",
    "HEAD_FORMAT",
    "TRUNK_INPUT",
    "TUNED_DIR",
    "FinetunedEncoder",
    "Head",
    "catalog_vectors",
    "TunedEncoder",
    "active_encoder",
    "active_version",
    "base_of",
    "describe_active",
    "is_tuned",
    "list_models",
    "load_tuned",
    "model_info",
    "open_tuned",
    "remove_model",
    "set_active",
    "tuned_root",
]
