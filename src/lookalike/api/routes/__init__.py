"""One APIRouter each: search, catalog (reads), images, catalog_writes, meta."""
