"""Read a catalog's metadata file (CSV or JSONL).

Columns: `product_id,image` are required; `title,category,price,in_stock` are optional;
any other column is kept as a product attribute. Image paths are relative to the
metadata file. Several rows may name the same product (one row per image).
A malformed row is reported as "FILE:LINE: reason" and skipped; a file that cannot be
used at all (missing, unreadable, no product_id/image column) raises MetadataError.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .catalog import PRODUCT_FIELDS, Product, attributes_json, check_product_id
from .errors import InputPathError, MetadataError, UsageError

REQUIRED = ("product_id", "image")
_TRUE = {"1", "true", "yes", "y", "t", "in stock", "in_stock", "instock", "available"}
_FALSE = {"0", "false", "no", "n", "f", "out of stock", "out_of_stock", "soldout", "sold out"}


@dataclass
class MetadataFile:
    path: Path
    products: dict[str, Product] = field(default_factory=dict)
    images: list[tuple[str, Path]] = field(default_factory=list)  # (product_id, absolute path)
    errors: list[str] = field(default_factory=list)  # "FILE:LINE: reason"
    fields: set[str] = field(default_factory=set)  # which product fields the file sets


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"in_stock must be true/false/yes/no/1/0, not {value!r}")


def parse_price(value: Any) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise ValueError(f"price must be a number, not {value!r}")
    try:
        price = float(str(value).strip().lstrip("$€£").replace(",", ""))
    except ValueError:
        raise ValueError(f"price must be a number, not {value!r}") from None
    if price != price or price < 0 or price in (float("inf"),):
        raise ValueError(f"price must be a non-negative number, not {value!r}")
    return price


def read_metadata(path: str | Path) -> MetadataFile:
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputPathError(f"metadata file not found: {path}")
    try:
        rows = list(_rows(path))
    except UnicodeDecodeError as exc:
        raise MetadataError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise InputPathError(f"cannot read metadata file {path}: {exc.strerror}") from None
    meta = MetadataFile(path=path.resolve())
    base = meta.path.parent
    for line, row in rows:
        if isinstance(row, str):  # a row-level parse error
            meta.errors.append(f"{path}:{line}: {row}")
            continue
        try:
            product, image = _product_row(row)
        except ValueError as exc:
            meta.errors.append(f"{path}:{line}: {exc}")
            continue
        image_path = Path(image).expanduser()
        if not image_path.is_absolute():
            image_path = base / image_path
        meta.fields.update(name for name in (*PRODUCT_FIELDS, "attributes") if name in row)
        if product.attributes:
            meta.fields.add("attributes")
        known = meta.products.get(product.product_id)
        if known is None:
            meta.products[product.product_id] = product
        else:  # first non-empty value wins; attributes merge
            for name in ("title", "category", "price"):
                if getattr(known, name) is None:
                    setattr(known, name, getattr(product, name))
            for key, value in product.attributes.items():
                known.attributes.setdefault(key, value)
        meta.images.append((product.product_id, Path(str(image_path))))
    return meta


def _rows(path: Path):
    """(line number, dict) per data row, or (line, error text) for an unreadable row."""
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        with path.open(encoding="utf-8") as fh:
            for number, text in enumerate(fh, start=1):
                if not text.strip():
                    continue
                try:
                    row = loads_finite(text)
                except json.JSONDecodeError as exc:
                    yield number, f"not valid JSON ({exc.msg})"
                    continue
                except ValueError as exc:
                    yield number, str(exc)
                    continue
                if not isinstance(row, dict):
                    yield number, "each line must be a JSON object"
                    continue
                missing = [c for c in REQUIRED if c not in row]
                if missing:
                    yield number, f"missing {', '.join(missing)}"
                    continue
                yield number, row
        return
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        try:
            header = [h.strip() for h in (reader.fieldnames or [])]
        except csv.Error as exc:
            raise MetadataError(f"{path}:1: unreadable CSV header ({exc})") from None
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise MetadataError(
                f"{path}:1: the header needs columns product_id,image"
                f" (missing {', '.join(missing)})"
            )
        reader.fieldnames = header
        for row in _csv_rows(reader, path):
            if None in row:  # more cells than header columns
                yield (
                    reader.line_num,
                    f"{len(header) + len(row[None])} cells, header has {len(header)}",
                )
                continue
            if any(value is None for value in row.values()):
                yield reader.line_num, "fewer cells than the header has columns"
                continue
            yield reader.line_num, row


def _csv_rows(reader: csv.DictReader, path: Path):
    """The reader's rows; a row the csv module cannot read (a field over its 131,072
    character limit) is a MetadataError naming its line (the reader cannot go on)."""
    while True:
        line = reader.line_num
        try:
            yield next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise MetadataError(
                f"{path}:{line + 1}: unreadable CSV row ({exc}; an unclosed quote makes the"
                " rest of the file one field)"
            ) from None


def loads_finite(text: str) -> Any:
    """`json.loads`, but NaN, Infinity and numbers too large for a float are a ValueError
    (Python's json accepts them; SQLite's JSON functions then fail on every query)."""
    return json.loads(text, parse_constant=_no_constant, parse_float=_finite)


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number lookalike can store (numbers must be finite)")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is too large a number (numbers must be finite)")
    return value


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _product_row(row: dict[str, Any]) -> tuple[Product, str]:
    product_id = check_product_id(_text(row.get("product_id")))
    image = _text(row.get("image")).strip()
    if not image:
        raise ValueError("empty image path")
    title = row.get("title")
    category = row.get("category")
    in_stock_raw = row.get("in_stock")
    in_stock = (
        True
        if in_stock_raw is None or (isinstance(in_stock_raw, str) and not in_stock_raw.strip())
        else parse_bool(in_stock_raw)
    )
    attributes = {
        key: value
        for key, value in row.items()
        if key not in (*REQUIRED, *PRODUCT_FIELDS) and key and value not in (None, "")
    }
    return (
        Product(
            product_id=product_id,
            title=(str(title).strip() or None) if title is not None else None,
            category=(str(category).strip() or None) if category is not None else None,
            price=parse_price(row.get("price")),
            in_stock=in_stock,
            attributes=attributes,
        ),
        image,
    )


def product_from_fields(fields: dict[str, Any]) -> Product:
    """A Product from the fields of an API write (product_id, title, category, price,
    in_stock, attributes), or UsageError naming what is wrong."""
    try:
        product_id = check_product_id(fields.get("product_id") or "")
        price = parse_price(fields.get("price"))
        in_stock = True if fields.get("in_stock") in (None, "") else parse_bool(fields["in_stock"])
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    attributes = fields.get("attributes") or {}
    if not isinstance(attributes, dict):
        raise UsageError("attributes must be an object of name: value")
    attributes_json(attributes)  # NaN/Infinity refused before any work
    return Product(
        product_id=product_id,
        title=fields.get("title") or None,
        category=fields.get("category") or None,
        price=price,
        in_stock=in_stock,
        attributes=dict(attributes),
    )
