"""Routing data: the canonical long table, validation, splits and one adapter per source."""

from router_ml.data.schema import (
    COLUMNS,
    REQUIRED_COLUMNS,
    RoutingTableError,
    read_table,
    table_hash,
    to_wide,
    validate_table,
    write_table,
)
from router_ml.data.taxonomy import TASK_TYPES, map_task

__all__ = [
    "COLUMNS",
    "REQUIRED_COLUMNS",
    "TASK_TYPES",
    "RoutingTableError",
    "map_task",
    "read_table",
    "table_hash",
    "to_wide",
    "validate_table",
    "write_table",
]
