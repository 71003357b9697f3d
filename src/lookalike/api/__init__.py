"""The product ranking API and the search page: what `lookalike serve` runs.

`create_app(engine=None, *, home=None, api_key=None, limits=Limits())` builds the FastAPI
app; `serve(home, host, port, ...)` runs it under uvicorn. OpenAPI lives at /docs.

- POST /search                      query photo (+ crop box, filters, k) -> ranked products
- GET  /products/{id}/similar        "more like this" from the product's own image(s)
- GET  /products, /products/{id}     browse the catalog
- POST /products, PATCH/DELETE /products/{id}
                                     catalog writes; need `Authorization: Bearer KEY`
                                     (KEY from LOOKALIKE_API_KEY); refused when no key is set
- GET  /images/{image_id}[?size=N]   catalog images by id (never by a path), thumbnails
- GET  /categories                   category names and counts (the page's filter)
- GET  /healthz, /readyz             process up / model loaded and catalog open
- GET  /                             the search page (src/lookalike/web/)

Every error a client can cause is a 4xx with {"error": <type>, "detail": <message>}.
Engine calls that burn CPU (decode, encode, search, thumbnails) run on worker threads,
never on the event loop; at most `Limits.max_concurrent_searches` of them run at once,
each with its share of the cores, and the rest queue on the event loop, so a burst of
clients waits in line instead of oversubscribing the cores.

The package, in the layout of FastAPI's "bigger applications":
    app.py          create_app: the app, its shared state, middleware, error handlers
    routes/         one APIRouter each, named after the OpenAPI tags: search, catalog
                    (products, categories), images, catalog_writes, meta (health, page)
    deps.py         dependencies: the engine, URL maker, CPU slots, the API key check
    holder.py       the engine opened in the background and warmed up for serving
    limits.py       Limits and RequestGate (the key, body size and body speed checked
                    before any work); auth.py: which requests are writes, the key check
    errors.py       the API's error types, error_body and the exception handlers
    schemas.py      the pydantic request/response models
    params.py       filter and attribute fields; uploads.py: query photo, crop, uploads
    thumbnails.py   thumbnails and their cache; adapters.py: thin calls over the engine
    server.py       serve(): uvicorn with connection limits and a header deadline
"""

from .app import create_app
from .errors import error_body
from .holder import tune_encoder_for_serving
from .limits import Limits
from .server import serve
from .uploads import load_query_image, parse_crop

__all__ = [
    "Limits",
    "create_app",
    "error_body",
    "load_query_image",
    "parse_crop",
    "serve",
    "tune_encoder_for_serving",
]
