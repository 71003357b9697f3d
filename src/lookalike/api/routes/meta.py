"""GET /healthz (the process is up), GET /readyz (the model is loaded and the catalog
open), and the search page at / (its files are mounted at /static by `create_app`)."""

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse

from ...errors import ModelError
from ...models import model_info
from ...query import describe, query_pipeline
from ..adapters import engine_info
from ..schemas import Health, Readiness

WEB_DIR = Path(__file__).parents[2] / "web"
"""The search page: src/lookalike/web/."""

PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter()

SOURCE_WORDS = {"labels": "labelled photos", "photos": "unlabelled photos"}


def tuned_on(home: Path, version: str) -> str | None:
    """What tuned model `version` learned from, in words ("category", "1,000 unlabelled
    photos + category"), from its model.json's sources. Read from the registry, not the
    loaded encoder: a model another process (`tune`, `serve --tune-every`) just made
    active is named before the first search loads it."""
    try:
        sources = model_info(home, version).get("sources") or {}
    except ModelError:  # a version being removed or damaged: readiness does not fail on it
        return None
    words = []
    for used in sources.get("used") or []:
        if used == "field":
            words.append(str((sources.get("field") or {}).get("name", "a catalog field")))
            continue
        count = (sources.get(used) or {}).get("photos")  # how many it learned from
        what = SOURCE_WORDS.get(used, str(used))
        words.append(f"{count:,} {what}" if isinstance(count, int) else what)
    return " + ".join(words) or None


@router.get("/healthz", response_model=Health, tags=["health"])
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz", response_model=Readiness, responses={503: {"model": Readiness}}, tags=["health"]
)
def readyz(request: Request) -> Any:
    holder = request.app.state.engine_holder
    if holder.engine is None:
        status = "failed" if holder.error else "loading"
        return JSONResponse(
            Readiness(status=status, detail=holder.error).model_dump(), status_code=503
        )
    info = engine_info(holder.engine)
    return Readiness(
        status="ready",
        products=info.get("products"),
        images=info.get("images"),
        model=info.get("model"),
        tuned=info.get("tuned"),
        tuned_on=tuned_on(holder.engine.home, info["tuned"]) if info.get("tuned") else None,
        calibrated_on=calibrated_on(holder.engine),
    )


def calibrated_on(engine: Any) -> int | None:
    """How many photos the query centre in use was calibrated on (`calibrate`, or
    `serve --calibrate-every`), or None when searches are not calibrated."""
    try:
        centre = describe(query_pipeline(engine.home, engine.encoder))["query_centre"]
    except Exception:  # a broken centre file: searches report it, readiness does not
        return None
    return centre["photos"] if centre else None


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
def index() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", headers=PAGE_HEADERS)
