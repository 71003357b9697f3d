"""`serve`: the API and the search page under uvicorn, as `lookalike serve` runs them."""

from pathlib import Path

from .app import create_app
from .limits import Limits


def serve(
    home: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    model: str | None = None,
    vector_store: str | None = None,
    api_key: str | None = None,
    limits: Limits | None = None,
    log_level: str = "info",
    access_log: bool = True,
) -> None:
    """Run the API and page under uvicorn until interrupted. `api_key` defaults to
    $LOOKALIKE_API_KEY (writes are refused without one); limits default to the
    LOOKALIKE_* environment (see `Limits`)."""
    import uvicorn

    app = create_app(
        home=home, api_key=api_key, limits=limits, model=model, vector_store=vector_store
    )
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        server_header=False,
        timeout_graceful_shutdown=5,
    )
