"""One resolution for every film: each film brought to the detail of a fixed-size copy.

In covidx-large the BIMCV COVID-19 and RSNA normal films come from a public copy in which
every film was resized to 224 x 224 (aspect not kept), while the other sources keep up to
512 px at their own aspect. After the lung crop and the usual framing, a 224 px film's lungs
are upsampled and soft, a 512 px film's downsampled and sharp: sharpness and lung shape tell
the copy apart, and within a class the copy is the hospital. With ``film_size = 224`` (a
recipe key) every film, in training, evaluation and the app alike, is seen as it would be in
such a copy: the part the model sees (the whole film or its lung crop) is resized by
``film_size / width`` across and ``film_size / height`` down, the scale that would bring the
whole film to ``film_size x film_size``. A film already that size is left as it is.

That copy's JPEG compression marks its films too: a model trained on covidx-large with
``film_size`` (and random recoding, `covidtl.augment.RandomRecode`) scored NIH films above the
unseen RSNA normals once they were passed through a 224 x 224 JPEG copy (docs/model-selection.md).
With ``film_jpeg = Q`` as well (a recipe key) every film is made into such a copy, whole: resized
to ``film_size x film_size`` (bicubic, antialiased), saved as JPEG at quality Q and decoded, and
only then cut to its lung box (`film_part`). The bimcv and rsna films, already such copies (JPEG
quality about 92), change little; every other film gains the same blocks at the same scale. That
removes this one cue, not every trace of the copy (the database's own 299 px step is another).
"""

from __future__ import annotations

import io

from PIL import Image

__all__ = ["at_film_size", "film_copy", "film_part"]


def at_film_size(part: Image.Image, film: tuple[int, int], film_size: int | None) -> Image.Image:
    """`part` of a film of size `film` (width, height), or the whole film, at the detail it
    would have in a ``film_size x film_size`` copy of that film; `part` itself when
    `film_size` is None or the film is already that size."""
    width, height = film
    if film_size is None or (width, height) == (film_size, film_size):
        return part
    if width < 1 or height < 1:
        raise ValueError(f"a film of {width} x {height} px has no pixels to resize")
    size = (max(1, round(part.width * film_size / width)), max(1, round(part.height * film_size / height)))
    return part.resize(size, Image.Resampling.BILINEAR)


def film_copy(film: Image.Image, film_size: int, quality: int) -> Image.Image:
    """`film` as a ``film_size x film_size`` JPEG copy of it at `quality`, decoded, in its own mode
    ("L" or RGB): resized first unless it is that size already (bicubic, antialiased)."""
    if film.width < 1 or film.height < 1:
        raise ValueError(f"a film of {film.width} x {film.height} px has no pixels to resize")
    if not 1 <= quality <= 95:
        raise ValueError(f"JPEG quality must be 1 to 95, not {quality}")
    copy = film if film.size == (film_size, film_size) else film.resize((film_size, film_size),
                                                                         Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    copy.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert(film.mode)


def film_part(film: Image.Image, box: tuple[int, int, int, int] | None, film_size: int | None,
              jpeg: int | None = None) -> Image.Image:
    """The part of `film` a model sees, at one resolution: its `box` (left, top, right, bottom, in
    the film's pixels; None for the whole film) at the detail of a ``film_size`` square copy
    (`at_film_size`); with `jpeg`, cut from the film's JPEG copy (`film_copy`) instead."""
    if jpeg is None:
        return at_film_size(film if box is None else film.crop(box), film.size, film_size)
    if film_size is None:
        raise ValueError("a film's JPEG copy needs its film_size")
    copy = film_copy(film, film_size, jpeg)
    if box is None:
        return copy
    sx, sy = film_size / film.width, film_size / film.height
    left, top, right, bottom = box
    scaled = (round(left * sx), round(top * sy), round(right * sx), round(bottom * sy))
    return copy.crop((scaled[0], scaled[1], max(scaled[2], scaled[0] + 1), max(scaled[3], scaled[1] + 1)))
