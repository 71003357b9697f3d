"""Contact sheets: a query image beside its results, with scores, as one PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .images import load_image

THUMB = 160
CAPTION = 34
PAD = 8


def thumbnail(source, size: int = THUMB) -> Image.Image:
    """A white size x size tile with the image fitted inside (or a grey 'unreadable' tile)."""
    tile = Image.new("RGB", (size, size), "white")
    try:
        image = source if isinstance(source, Image.Image) else load_image(source, draft_size=size)
        image = image.copy()
        image.thumbnail((size, size), Image.Resampling.LANCZOS)
        tile.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    except Exception:
        ImageDraw.Draw(tile).text((8, size // 2), "unreadable", fill="grey")
    return tile


def words_tile(text: str, size: int = THUMB) -> Image.Image:
    """A white tile with the words of a words-only query written on it."""
    tile = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(tile)
    words, lines = text.split(), [""]
    for word in words:
        if lines[-1] and len(lines[-1]) + 1 + len(word) > 16:
            lines.append("")
        lines[-1] = (lines[-1] + " " + word).strip()
    for i, line in enumerate(lines[:7]):
        draw.text((10, 12 + 20 * i), line, fill="#1f6feb", font=_font(16))
    return tile


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def draw_rows(rows: Sequence[tuple[str, object, Sequence[tuple[str, object, str]]]]) -> Image.Image:
    """Rows of (row label, query image source, [(caption, image source, colour)])."""
    width_tiles = 1 + max((len(items) for _, _, items in rows), default=0)
    row_h = THUMB + CAPTION + PAD
    sheet = Image.new(
        "RGB", (PAD + width_tiles * (THUMB + PAD) + PAD, PAD + len(rows) * row_h), "#f4f4f4"
    )
    draw = ImageDraw.Draw(sheet)
    font = _font(12)
    for r, (label, query, items) in enumerate(rows):
        y = PAD + r * row_h
        sheet.paste(thumbnail(query) if query is not None else words_tile(label), (PAD, y))
        draw.rectangle([PAD - 2, y - 2, PAD + THUMB + 1, y + THUMB + 1], outline="#1f6feb", width=2)
        draw.text((PAD, y + THUMB + 3), _clip(label, 24), fill="#1f6feb", font=font)
        for c, (caption, source, colour) in enumerate(items):
            x = PAD + (c + 1) * (THUMB + PAD) + PAD
            sheet.paste(thumbnail(source), (x, y))
            for line_no, line in enumerate(caption.split("\n")[:2]):
                draw.text(
                    (x, y + THUMB + 3 + 14 * line_no), _clip(line, 24), fill=colour, font=font
                )
    return sheet


def draw_results_sheet(queries: Sequence[tuple[str, object, Sequence]], path: str | Path) -> Path:
    """Write a sheet for (label, query source, results) triples; results are search.Result."""
    rows = [
        (
            label,
            query,
            [
                (f"{i + 1}. {r.score:.3f}\n{r.product_id}", r.image, "black")
                for i, r in enumerate(results)
            ],
        )
        for label, query, results in queries
    ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_rows(rows).save(path)
    return path


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
