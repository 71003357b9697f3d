"""Typed errors a user can cause. The CLI turns them into one-line messages and exit
codes; the API turns them into 4xx JSON bodies. Anything else is a bug."""

from __future__ import annotations


class LookalikeError(Exception):
    """Base class. `exit_code` is the CLI's exit status, `http_status` the API's."""

    exit_code = 1
    http_status = 400


class UsageError(LookalikeError):
    """Bad arguments or options (also bad filters)."""

    exit_code = 2
    http_status = 422


class InputPathError(LookalikeError):
    """A path the user named does not exist or cannot be read."""

    exit_code = 3
    http_status = 404


class ImageError(LookalikeError):
    """An image that cannot be decoded: corrupt, truncated, empty, not an image."""

    exit_code = 4
    http_status = 415


class ImageTooLargeError(ImageError):
    """Too many bytes or pixels (decompression bombs included)."""

    http_status = 413


class MetadataError(LookalikeError):
    """A malformed metadata file or row; the message names file and line."""

    exit_code = 5
    http_status = 422


class UnknownProductError(LookalikeError):
    """A product id that is not in the catalog."""

    exit_code = 6
    http_status = 404


class ModelError(LookalikeError):
    """A model that cannot be loaded, exported, or does not fit the catalog."""

    exit_code = 7
    http_status = 500


class CatalogMismatchError(ModelError):
    """Vectors from two different models would be compared."""


class ProductExistsError(UsageError):
    """Adding a product id that is already in the catalog."""

    http_status = 409


class UnknownImageError(LookalikeError):
    """An image id that is not in the catalog."""

    exit_code = 6
    http_status = 404


class DuplicateImageError(LookalikeError):
    """A new image is a copy of another product's image, and duplicates were refused."""

    exit_code = 9
    http_status = 409
