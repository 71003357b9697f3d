"""Request fields turned into domain values: the search filters (category, price,
stock, `attr.<name>` fields) and the attributes of a product being added."""

from collections.abc import Iterable, Sequence
from typing import Any

from ..catalog import Filters
from ..errors import UsageError
from ..metadata import loads_finite

ATTR_PREFIX = "attr."
"""Attribute equality filters are fields/query parameters named `attr.<name>`."""


def attribute_filters(items: Iterable[tuple[str, Any]]) -> dict[str, str]:
    """`attr.<name>=<value>` fields -> {name: value}."""
    attrs: dict[str, str] = {}
    for key, value in items:
        if not key.startswith(ATTR_PREFIX):
            continue
        name = key[len(ATTR_PREFIX) :]
        if not isinstance(value, str):
            raise UsageError(f"filter {key} must be text, not a file")
        if not name:
            raise UsageError("attribute filter needs a name: attr.<name>=<value>")
        attrs[name] = value
    return attrs


def parse_attributes(text: str | None) -> dict[str, Any]:
    """The `attributes` form field: a JSON object of text, number or true/false values."""
    if text is None or not text.strip():
        return {}
    try:
        data = loads_finite(text)
    except ValueError as exc:
        raise UsageError(f"attributes must be a JSON object: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError('attributes must be a JSON object such as {"colour": "Red"}')
    for key, value in data.items():
        if not isinstance(value, str | int | float | bool) or not key:
            raise UsageError(f"attribute {key!r} must have a text, number or true/false value")
    return data


def make_filters(
    category: str | Sequence[str] | None,
    price_min: float | None,
    price_max: float | None,
    in_stock: bool | None,
    attrs: dict[str, str],
) -> Filters | None:
    if category is not None and not isinstance(category, str):
        category = [c for c in category if c] or None
        if category is not None and len(category) == 1:
            category = category[0]
    filters = Filters(
        category=category or None,
        price_min=price_min,
        price_max=price_max,
        in_stock=in_stock,
        attrs=attrs,
    )
    filters.validate()  # bad combinations are 422s, before any CPU is spent
    return None if filters.is_empty() else filters
