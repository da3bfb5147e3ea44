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
"""

from __future__ import annotations

from PIL import Image

__all__ = ["at_film_size"]


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
