"""The request and response bodies of the API (pydantic models), as OpenAPI shows them."""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .. import __version__


class SearchResult(BaseModel):
    product_id: str
    score: float = Field(
        description="Cosine similarity of the best-matching product image; with words,"
        " the combined score (photo and words) or the words score (words alone)"
    )
    title: str | None = None
    category: str | None = None
    price: float | None = None
    in_stock: bool | None = None
    image_id: int = Field(description="The product image that matched best")
    image_url: str = Field(description="Thumbnail of that image, sized for result grids")
    full_image_url: str
    attributes: dict[str, Any] = Field(default_factory=dict)
    visual: float | None = Field(
        default=None, description="Cosine of the best image (null when words alone)"
    )
    text: float | None = Field(
        default=None, description="Words score, 0..1 (null when photo alone)"
    )
    combined: float | None = Field(default=None, description="The score the ranking used")
    matched: list[str] | None = Field(
        default=None, description="The query's words this product has (null when photo alone)"
    )


class SearchResponse(BaseModel):
    results: list[SearchResult]
    took_ms: float = Field(description="Server time for this request, decode to ranking")
    mode: str = Field(default="photo", description="photo, words or both")
    words: list[str] | None = Field(default=None, description="The words searched for")
    unmatched: list[str] | None = Field(default=None, description="Words that no result has")
    note: str | None = Field(
        default=None,
        description="e.g. words that match no product: the photo's results came back",
    )
    text_weight: float | None = Field(default=None, description="Words' share (photo+words)")


class ProductImage(BaseModel):
    image_id: int
    image_url: str
    full_image_url: str


class ProductOut(BaseModel):
    product_id: str
    title: str | None = None
    category: str | None = None
    price: float | None = None
    in_stock: bool
    attributes: dict[str, Any] = Field(default_factory=dict)
    images: list[ProductImage] = Field(default_factory=list)


class ProductPage(BaseModel):
    products: list[ProductOut]
    total: int
    limit: int
    offset: int


class ProductPatch(BaseModel):
    """Fields to change; omitted fields stay. Attribute changes merge into the existing
    attributes; an attribute set to null is removed."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    title: str | None = None
    category: str | None = None
    price: float | None = Field(default=None, ge=0)
    in_stock: bool = Field(default=None, description="true or false (null is refused)")
    attributes: dict[str, str | int | float | bool | None] | None = None


class Category(BaseModel):
    name: str
    count: int


class CategoryList(BaseModel):
    categories: list[Category]


class Health(BaseModel):
    status: str
    version: str = __version__


class Readiness(BaseModel):
    status: str
    products: int | None = None
    images: int | None = None
    model: str | None = None
    tuned: str | None = None  # the active tuned version (`lookalike tune`), if any
    tuned_on: str | None = None  # what it learned from, e.g. "category"
    calibrated_on: int | None = None  # photos of the query centre in use (`calibrate`)
    detail: str | None = None


class ErrorBody(BaseModel):
    error: str
    detail: str


# The error statuses an endpoint may answer, for its OpenAPI `responses`.
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 408, 409, 413, 415, 422, 503)
}


class DuplicateImageOut(BaseModel):
    product_id: str
    image: str = Field(description="The image's URL on this server (never a file path)")
    image_id: int


class DuplicateGroupOut(BaseModel):
    score: float = Field(description="Lowest verified same-photo score that joined the group")
    images: list[DuplicateImageOut]


class DuplicatePage(BaseModel):
    groups: list[DuplicateGroupOut]
    total: int = Field(description="Groups in the whole report")
    limit: int
    offset: int
    threshold: float
    images: int = Field(description="Catalog images scanned")


class ProductAdded(ProductOut):
    duplicates: list[DuplicateGroupOut] = Field(
        default_factory=list,
        description="New images that are the same photo as another product's: [new, other]",
    )
