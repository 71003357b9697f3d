"""Changing the catalog: POST /products (a product with its images, or more images for
one), PATCH /products/{id} and DELETE /products/{id}. Every route here needs the API key
(`require_key`); each change is searchable as soon as the route returns."""

from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response

from ...errors import LookalikeError, UsageError
from ...images import load_image
from ..adapters import product_payload
from ..deps import Cpu, EngineDep, LimitsDep, Urls, require_key
from ..params import attribute_filters, parse_attributes
from ..schemas import ERRORS, ProductAdded, ProductOut, ProductPatch
from ..uploads import read_upload, with_file_name
from .duplicates import group_out

router = APIRouter(tags=["catalog writes"], dependencies=[Depends(require_key)])


@router.post(
    "/products",
    status_code=201,
    response_model=ProductAdded,
    responses={**ERRORS, 409: ERRORS[422]},
    summary="Add a product (or add images to an existing one) with its image(s)",
)
async def add_product(
    request: Request,
    engine: EngineDep,
    urls: Urls,
    cpu: Cpu,
    limits: LimitsDep,
    product_id: Annotated[str, Form(min_length=1, max_length=200)],
    images: Annotated[list[UploadFile], File(description="One or more product images")],
    title: Annotated[str | None, Form()] = None,
    category: Annotated[str | None, Form()] = None,
    price: Annotated[float | None, Form(ge=0, allow_inf_nan=False)] = None,
    in_stock: Annotated[bool, Form()] = True,
    attributes: Annotated[
        str | None, Form(description='JSON object of attributes, e.g. {"colour": "Red"}')
    ] = None,
    reject_duplicates: Annotated[
        bool,
        Form(description="refuse (409) an image that is the same photo as another product's"),
    ] = False,
) -> JSONResponse:
    """Attributes: a JSON object in `attributes`, and/or form fields
    `attr.<name>=<value>`. The product is searchable as soon as this returns. Images that
    are the same photo as another product's image are listed in `duplicates` (and refused
    with 409, nothing added, when `reject_duplicates` is true)."""
    form = await request.form()
    attributes_ = parse_attributes(attributes)
    attributes_.update(attribute_filters(form.multi_items()))
    if len(images) > limits.max_images_per_product:
        raise UsageError(
            f"{len(images)} images; at most {limits.max_images_per_product} per request"
        )
    blobs = [await read_upload(f, limits.max_image_bytes) for f in images]
    fields_ = {
        "product_id": product_id.strip(),
        "title": title,
        "category": category,
        "price": price,
        "in_stock": in_stock,
        "attributes": attributes_,
    }

    def work() -> ProductAdded:
        # decode every upload first: a bad file is refused before the catalog changes
        for number, (blob, upload) in enumerate(zip(blobs, images, strict=True), start=1):
            try:
                load_image(
                    blob, max_pixels=limits.max_image_pixels, max_bytes=limits.max_image_bytes
                )
            except LookalikeError as exc:
                name = f"image {number} ({upload.filename or 'upload'})"
                raise with_file_name(exc, name) from None
        _, found = engine.add_product_checked(fields_, blobs, reject_duplicates)
        product = product_payload(engine, fields_["product_id"], urls)
        return ProductAdded(**product.model_dump(), duplicates=[group_out(g, urls) for g in found])

    product = await cpu.run(work)
    return JSONResponse(
        product.model_dump(),
        status_code=201,
        headers={"Location": f"{urls.root}/products/{quote(product.product_id, safe='')}"},
    )


@router.patch(
    "/products/{product_id}",
    response_model=ProductOut,
    responses=ERRORS,
)
def update_product(
    engine: EngineDep, urls: Urls, product_id: str, patch: ProductPatch
) -> ProductOut:
    changes = patch.model_dump(exclude_unset=True)
    if not changes:
        raise UsageError(
            "nothing to change: send a JSON object with title, category, price,"
            " in_stock and/or attributes"
        )
    if "in_stock" in changes and changes["in_stock"] is None:
        raise UsageError("in_stock must be true or false")
    engine.update_product(product_id, changes)
    return product_payload(engine, product_id, urls)


@router.delete(
    "/products/{product_id}",
    status_code=204,
    response_class=Response,
    responses=ERRORS,
)
def delete_product(engine: EngineDep, product_id: str) -> Response:
    engine.get_product(product_id)  # 404 for an unknown id
    engine.remove([product_id])
    return Response(status_code=204)
