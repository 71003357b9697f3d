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


class ImageInUseError(UsageError):
    """An uploaded photo that is already the image of another product."""

    http_status = 409


class UnknownImageError(LookalikeError):
    """An image id that is not in the catalog."""

    exit_code = 6
    http_status = 404


class BusyError(LookalikeError):
    """Something another process holds: a Milvus Lite file open elsewhere, or the home's
    writer lock not released in time. The message names the way out. (Exit status 8
    is taken: `index` finished with skipped files.)"""

    exit_code = 9
    http_status = 409


class StorageError(LookalikeError):
    """The home cannot be written: the disk is full, a file is over its size limit, the
    file system is read-only. What was committed stays; the next `index` resumes."""

    exit_code = 10
    http_status = 507

    CAUSES = ("ENOSPC", "EDQUOT", "EFBIG", "EROFS")

    @classmethod
    def from_os_error(cls, exc: BaseException) -> StorageError | None:
        """A StorageError for an OSError (or SQLite's "disk is full") that says the
        disk cannot take the write, else None."""
        import errno
        import sqlite3

        codes = {getattr(errno, name) for name in cls.CAUSES if hasattr(errno, name)}
        if isinstance(exc, OSError) and exc.errno in codes:
            where = f" writing {exc.filename}" if exc.filename else ""
            return cls(f"{exc.strerror}{where}: free space and run it again (index resumes)")
        if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
            return cls(f"the catalog cannot grow ({exc}): free space and run it again")
        return None


class DuplicateImageError(LookalikeError):
    """A new image is a copy of another product's image, and duplicates were refused."""

    exit_code = 11
    http_status = 409
