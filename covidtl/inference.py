"""Run exported models on uploaded images: load once, preprocess, predict, explain.

- `load_upload` turns an uploaded file (image or DICOM) into an RGB image, refusing empty,
  oversized and unreadable files with a `BadInputError` that says what is accepted.
- `Predictor` wraps one exported model (safetensors + card): the card's preprocessing,
  its operating threshold, and a lock that serializes every forward pass on the model,
  because CAM hooks on a shared model would otherwise catch other threads' passes.
- `ModelStore` is a folder of exported models: cards are read at once, weights on first
  use, then reused. `load_predictors` loads a whole folder eagerly.
- `LoadOnce` holds anything else that is loaded on first use (the input check, the lung
  model), so that starting an app loads nothing and concurrent first requests share one load.

Only ``.safetensors`` weights with a JSON card are ever loaded; pickles are ignored.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError
from torchvision.transforms import v2

from covidtl.classes import CLASSES, POSITIVE
from covidtl.dicom import HEAD_LENGTH, DicomError, is_dicom, read_dicom
from covidtl.explain import DEFAULT_METHOD, explain
from covidtl.export import CARD_SUFFIX, CardError, card_temperature, list_exported, load_model, read_card
from covidtl.harmonize import film_part
from covidtl.images import UnreadableImageError, load_image
from covidtl.models import ModelSpec, get_spec
from covidtl.transforms import eval_view, input_steps

if TYPE_CHECKING:
    from covidtl.lungs import LungCrop

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_UPLOAD_BYTES = 50 * 2**20
MAX_PIXELS = 50_000_000  # about 7000 x 7000; real chest X-rays are under 20 megapixels
MIN_SIDE = 32  # pixels; smaller is no radiograph (and would only be upsampled noise)
MAX_ASPECT = 4.0  # longer side / shorter side; chest X-rays are near 1
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".ckpt", ".bin", ".pkl"})
ACCEPTED = "PNG, JPEG, BMP or TIFF (8- or 16-bit), or a DICOM file"
DEFAULT_CROP_FRACTION = 0.9


class BadInputError(ValueError):
    """An uploaded file that cannot be classified; the message is meant for the user."""


class ModelLoadError(RuntimeError):
    """An exported model whose weights or card cannot be loaded."""


# --------------------------------------------------------------------------- uploads


def _decoder_failure(path: Path, err: BaseException) -> BadInputError:
    return BadInputError(
        f"{path.name} cannot be decoded ({type(err).__name__}: {err}); it may be truncated or corrupt. "
        f"Upload {ACCEPTED}"
    )


def _check_geometry(name: str, width: int, height: int, max_pixels: int) -> None:
    """Refuse sizes no chest X-ray has: over `max_pixels`, a side under MIN_SIDE, or a
    strip (the resize to the model's input would blow a 5 x 100,000 strip up to gigabytes)."""
    if width * height > max_pixels:
        raise BadInputError(
            f"{name} is {width} x {height} = {width * height / 1e6:.1f} megapixels; "
            f"the limit is {max_pixels / 1e6:.0f} megapixels. Downscale it and upload again"
        )
    ratio = max(width, height) / max(1, min(width, height))
    if min(width, height) < MIN_SIDE or ratio > MAX_ASPECT:
        raise BadInputError(
            f"{name} is {width} x {height} pixels; a chest X-ray needs at least {MIN_SIDE} pixels on each "
            f"side and an aspect ratio of at most {MAX_ASPECT:g}:1 (this one is {ratio:.1f}:1)"
        )


def _check_header(path: Path, max_pixels: int) -> None:
    """Refuse images whose header declares a size `_check_geometry` refuses, before decoding."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Image.DecompressionBombError as err:
        # PIL refuses more than 2 x MAX_IMAGE_PIXELS at open, before we see the size.
        claimed = re.search(r"\((\d+) pixels\)", str(err))
        amount = f"{int(claimed.group(1)) / 1e6:.1f} megapixels" if claimed else "far more pixels than allowed"
        raise BadInputError(
            f"{path.name} declares {amount} (a decompression bomb?); the limit is {max_pixels / 1e6:.0f} "
            "megapixels. Downscale it and upload again"
        ) from err
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise BadInputError(f"{path.name} is not an image this app can read; upload {ACCEPTED}") from err
    except ValueError as err:  # PIL's own limits, e.g. a text chunk that inflates past MAX_TEXT_CHUNK
        raise BadInputError(f"{path.name} cannot be read safely ({err}); upload {ACCEPTED}") from err
    except Exception as err:  # any failure of a decoder on an untrusted file means "unreadable"
        log.warning("cannot open upload %s", path.name, exc_info=True)
        raise _decoder_failure(path, err) from err
    _check_geometry(path.name, width, height, max_pixels)


def _check_not_blank(name: str, image: Image.Image) -> None:
    """Refuse an 8-bit "L" or RGB image whose pixels are all one colour."""
    extrema = image.getextrema()  # (min, max) for one band, ((min, max), ...) for several
    if image.mode == "L":
        extrema = (extrema,) * 3  # reported as the RGB colour it stands for
    if all(low == high for low, high in extrema):
        value = tuple(low for low, _ in extrema)
        raise BadInputError(
            f"{name} is blank: every pixel is {value} after conversion to 8 bits, so there is nothing to "
            f"classify; upload the X-ray itself ({ACCEPTED})"
        )


def load_upload(
    path: str | Path | None,
    max_bytes: int = MAX_UPLOAD_BYTES,
    max_pixels: int = MAX_PIXELS,
    min_side: int | None = None,
) -> Image.Image:
    """Read an uploaded file as an 8-bit image: "L" for a grey image file (8 or 16-bit),
    RGB for colour images and DICOM. `Predictor` takes either.

    DICOM is recognised by its ``DICM`` signature or a ``.dcm``/``.dicom`` name; anything
    else is opened as an image (PNG, JPEG, BMP, TIFF, 8 or 16 bit). Sizes are checked from
    the header, before any pixel is decoded. With `min_side` (e.g. the largest
    `Predictor.resize_side` of the models to run) a big image (not DICOM) comes back
    reduced, as `covidtl.images.load_image` does: much faster, nearly the same model input.

    Raises:
        BadInputError: no file, an empty or missing file, more than `max_bytes` bytes or
            `max_pixels` pixels, a side under `MIN_SIDE` pixels or an aspect ratio over
            `MAX_ASPECT`, a blank image (one value everywhere), or a file that is not a
            readable image or DICOM. The message says what is wrong and what is accepted.
    """
    if path is None or str(path) == "":
        raise BadInputError(f"no file was uploaded; choose a chest X-ray ({ACCEPTED})")
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise BadInputError(f"the uploaded file {path.name} is no longer there; upload it again") from None
    if size == 0:
        raise BadInputError(f"{path.name} is empty (0 bytes); upload {ACCEPTED}")
    if size > max_bytes:
        raise BadInputError(
            f"{path.name} is {size:,} bytes, over the upload limit of {max_bytes / 2**20:.0f} MiB; "
            "export it smaller (e.g. as PNG or JPEG) and upload again"
        )
    with open(path, "rb") as f:
        head = f.read(HEAD_LENGTH)

    if is_dicom(head) or path.suffix.lower() in DICOM_SUFFIXES:
        try:
            image = read_dicom(path, max_pixels=max_pixels)
        except DicomError as err:
            raise BadInputError(f"{path.name}: {err}") from err
        except Exception as err:  # see _check_header
            log.warning("cannot decode DICOM upload %s", path.name, exc_info=True)
            raise _decoder_failure(path, err) from err
        _check_geometry(path.name, *image.size, max_pixels)
    else:
        _check_header(path, max_pixels)
        try:
            image = load_image(path, min_side=min_side, grey=True)
        except UnreadableImageError as err:
            raise _decoder_failure(path, err.__cause__ or err) from err
        except Exception as err:  # see _check_header
            log.warning("cannot decode upload %s", path.name, exc_info=True)
            raise _decoder_failure(path, err) from err
    _check_not_blank(path.name, image)
    return image


# --------------------------------------------------------------------------- predictor


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")  # convert() would copy an RGB image


def _l_or_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "L" else _rgb(image)


@dataclass(frozen=True)
class Prediction:
    """One model's answer for one image.

    `probabilities` maps every name in `CLASSES` to its calibrated probability,
    softmax(logits / T) with the card's temperature T;
    `decision` is True (COVID-19 flagged) when ``p_positive >= threshold``, the model's
    operating threshold from its card. `latency_ms` covers preprocessing (when the call
    did it) and the forward pass, not time spent waiting for the model's lock.
    """

    probabilities: dict[str, float]
    p_positive: float
    decision: bool
    threshold: float
    latency_ms: float


class Predictor:
    """One exported model, loaded once and safe to share between threads.

    The lock serializes every forward pass (plain or with CAM hooks) on the model.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        card: dict[str, Any],
        device: str | torch.device = "cpu",
        lung_model: torch.nn.Module | None = None,
    ) -> None:
        """`lung_model`: the lung model named in the card's ``lung_crop``, for models
        trained on lung crops (required for them, ignored otherwise)."""
        if card.get("lung_crop") and lung_model is None:
            raise CardError(f"model {card['name']!r} was trained on lung crops: it needs its lung model "
                            f"{card['lung_crop']['lung_model']!r}")
        self.lungs = lung_model.eval() if card.get("lung_crop") else None
        self.model = model.to(device).eval()
        self.card = card
        self.device = torch.device(device)
        self.name: str = card["name"]
        self.spec: ModelSpec = get_spec(card["architecture"])
        self.threshold = float(card["threshold"])
        # shown and thresholded probabilities are softmax(logits / T), as at export
        self.temperature = card_temperature(card)
        self.input_size = int(card["input_size"])
        self.crop_fraction = float(card.get("crop_fraction", DEFAULT_CROP_FRACTION))
        self.mean = tuple(float(m) for m in card["mean"])
        self.std = tuple(float(s) for s in card["std"])
        self.equalize = bool(card.get("equalize", False))
        # Films at one resolution (covidtl.harmonize), as the training cache made them; None: their own.
        self.film_size = None if card.get("film_size") is None else int(card["film_size"])
        self.film_jpeg = None if card.get("film_jpeg") is None else int(card["film_jpeg"])
        # The eval transform of training (covidtl.transforms.build_transform), in two parts: the
        # framing of the 8-bit image, then the tensor. An "L" image is framed in its one
        # band and repeated into three only as a tensor: the numbers of its RGB copy, for
        # a third of the resizing.
        self._view = v2.Compose(eval_view(self.input_size, self.crop_fraction, self.equalize))
        to_image, to_float, self._normalize = input_steps(self.mean, self.std)
        self._to_float = v2.Compose([to_image, to_float])
        # The resize before the crop: images need no more than this shorter side (see load_upload).
        # A lung crop keeps about half the film's side: twice as many pixels keep it sharp.
        self.resize_side = round(self.input_size / self.crop_fraction) * (2 if self.lungs is not None else 1)
        self.lock = threading.Lock()

    @classmethod
    def from_file(cls, path: str | Path, device: str | torch.device = "cpu") -> Predictor:
        """Load ``<name>.safetensors`` and its card (see `covidtl.export.load_model`)."""
        model, card = load_model(path, device=device)
        lung_model = None
        if card.get("lung_crop"):
            from covidtl.lungs import load_lung_model

            crop = card["lung_crop"]
            lung_model, lung_card = load_lung_model(Path(path).with_name(f"{crop['lung_model']}.safetensors"))
            if lung_card["weights_sha256"] != crop["lung_model_sha256"]:
                raise CardError(f"{path}: trained with lung model {crop['lung_model']} sha256 "
                                f"{crop['lung_model_sha256'][:12]}..., but the one beside it differs; ship the same one")
        return cls(model, card, device, lung_model)

    @property
    def geometry(self) -> tuple:
        """Models with equal geometry turn an image into the same input tensor."""
        lungs = self.card["lung_crop"]["lung_model_sha256"] if self.lungs is not None else None
        return (self.input_size, self.crop_fraction, self.equalize, self.mean, self.std, lungs, self.film_size,
                self.film_jpeg)

    def lung_crop(self, image: Image.Image, located: LungCrop | None = None) -> LungCrop | None:
        """For a lung-crop model, `image` cut to its lungs (the training cache's
        `covidtl.lungs.crop_to_lungs`; kept whole when its mask is implausible), with the
        mask: one pass of the lung model, to hand to `preprocess`, `view` and the lungs'
        outline. None for other models. `located`: the lungs of this `image` already found
        by this model's own lung model (`covidtl.lungs.locate_lungs`), to crop without
        another pass."""
        if self.lungs is None:
            return None
        from covidtl.lungs import crop_located, crop_to_lungs

        if located is None:
            return crop_to_lungs(_l_or_rgb(image), self.lungs)
        return crop_located(replace(located, image=_l_or_rgb(image)))

    def uses_lung_model(self, sha256: str | None) -> bool:
        """Whether this is a lung-crop model trained with the lung model whose weights have
        checksum `sha256` (`covidtl.lungs.LungOutliner.sha256`)."""
        return self.lungs is not None and sha256 is not None and self.card["lung_crop"]["lung_model_sha256"] == sha256

    def framed(self, image: Image.Image, lung_crop: LungCrop | None = None) -> Image.Image:
        """`image` as "L" or RGB, cut to its lungs first for a lung-crop model (`lung_crop`
        when given, else `self.lung_crop(image)`), at the card's film size
        (`covidtl.harmonize.film_part`: from its JPEG copy when the card has ``film_jpeg``) when it
        has one."""
        box = None if self.lungs is None else (lung_crop or self.lung_crop(image)).box
        return film_part(_l_or_rgb(image), box, self.film_size, self.film_jpeg)

    def preprocess(self, image: Image.Image, lung_crop: LungCrop | None = None) -> torch.Tensor:
        """8-bit "L" or RGB image (others are converted to RGB) -> normalized float32
        tensor [1, 3, S, S] on the model's device. `lung_crop`: `self.lung_crop(image)`, if
        already made."""
        x = self._to_float(self._view(self.framed(image, lung_crop)))
        return self._normalize(x.expand(3, -1, -1)).unsqueeze(0).to(self.device)

    def view(self, image: Image.Image, lung_crop: LungCrop | None = None) -> np.ndarray:
        """The part of `image` the model sees (resized, center-cropped), uint8 [S, S, 3]."""
        return np.asarray(_rgb(self._view(self.framed(image, lung_crop))))

    def predict(self, image: Image.Image | torch.Tensor) -> Prediction:
        """Classify an RGB image, or a tensor from `preprocess` of an equal-geometry model."""
        start = time.perf_counter()
        x = self.preprocess(image) if isinstance(image, Image.Image) else image.to(self.device)
        elapsed = time.perf_counter() - start
        with self.lock:
            start = time.perf_counter()
            with torch.inference_mode():
                logits = self.model(x)
            elapsed += time.perf_counter() - start
        probs = torch.softmax(logits.float() / self.temperature, dim=1)[0].tolist()
        p_positive = probs[POSITIVE]
        return Prediction(
            probabilities=dict(zip(CLASSES, probs)),
            p_positive=p_positive,
            decision=p_positive >= self.threshold,
            threshold=self.threshold,
            latency_ms=1000.0 * elapsed,
        )

    def explain(
        self, image: Image.Image | torch.Tensor, method: str = DEFAULT_METHOD, class_index: int = POSITIVE
    ) -> np.ndarray:
        """CAM heatmap [S, S] in [0, 1] over `view(image)`, hooked at the spec's `cam_layer`."""
        x = self.preprocess(image) if isinstance(image, Image.Image) else image.to(self.device)
        with self.lock:
            return explain(self.model, x, self.spec.cam_layer, method, class_index)


# --------------------------------------------------------------------------- folders


_LOAD_ERRORS = (CardError, FileNotFoundError, OSError, ValueError, RuntimeError, KeyError, SafetensorError)


class ModelStore:
    """The exported models in one folder: cards are read now, weights on first `get`.

    `cards` maps model name -> card for every loadable-looking model; `skipped` maps file
    name -> reason for files that will not be offered (broken cards, weights without a
    card, pickles, duplicate names, weights that failed to load).
    """

    def __init__(self, weights_dir: str | Path, device: str | torch.device = "cpu") -> None:
        self.weights_dir = Path(weights_dir)
        self.device = device
        self.cards: dict[str, dict[str, Any]] = {}
        self.skipped: dict[str, str] = {}
        self._paths: dict[str, Path] = {}
        self._predictors: dict[str, Predictor] = {}
        self._failed: dict[str, str] = {}
        self._lock = threading.Lock()
        self._scan()

    def _skip(self, path: Path, reason: str) -> None:
        log.warning("skipping %s: %s", path, reason)
        self.skipped[path.name] = reason

    def _scan(self) -> None:
        if not self.weights_dir.is_dir():
            return
        for path in sorted(self.weights_dir.iterdir()):
            if path.suffix.lower() in PICKLE_SUFFIXES:
                self._skip(path, "pickled checkpoints are never loaded (unpickling runs code); export to safetensors")
            elif path.suffix == ".safetensors" and not path.with_suffix(CARD_SUFFIX).is_file():
                self._skip(path, f"no model card {path.with_suffix(CARD_SUFFIX).name} beside it")
        for path in list_exported(self.weights_dir):
            try:
                card = read_card(path.with_suffix(CARD_SUFFIX))
            except CardError as err:
                self._skip(path, str(err))
                continue
            name = card["name"]
            if name in self.cards:
                self._skip(path, f"model name {name!r} is already used by {self._paths[name].name}")
                continue
            self.cards[name] = card
            self._paths[name] = path

    def names(self) -> list[str]:
        """Names of the models on offer, sorted by file name."""
        return list(self.cards)

    def get(self, name: str) -> Predictor:
        """The loaded model `name` (loaded on first call, then reused)."""
        if name not in self.cards:
            raise ValueError(f"unknown model {name!r}; available: {self.names()}")
        with self._lock:
            if name in self._failed:
                raise ModelLoadError(self._failed[name])
            if name not in self._predictors:
                path = self._paths[name]
                try:
                    self._predictors[name] = Predictor.from_file(path, self.device)
                except _LOAD_ERRORS as err:
                    self._failed[name] = f"model {name!r} ({path.name}) could not be loaded: {err}"
                    self._skip(path, str(err))
                    raise ModelLoadError(self._failed[name]) from err
            return self._predictors[name]

    def load_all(self) -> dict[str, Predictor]:
        """Every model that loads, by name; failures are logged and listed in `skipped`."""
        loaded = {}
        for name in self.names():
            try:
                loaded[name] = self.get(name)
            except ModelLoadError:
                continue  # already logged and recorded in self.skipped by get()
        return loaded


def load_predictors(weights_dir: str | Path, device: str | torch.device = "cpu") -> dict[str, Predictor]:
    """Load every exported model in `weights_dir` (safetensors + card), by card name.

    Broken cards or weights are logged and skipped; pickled checkpoints are never loaded.
    """
    return ModelStore(weights_dir, device).load_all()


class LoadOnce(Generic[T]):
    """A value made by `load()` on the first `get()`, then reused. Threads that ask while it
    is being made wait for that one load instead of starting their own; a load that raises
    is not kept, so the next `get()` tries again (and raises again if nothing changed)."""

    def __init__(self, load: Callable[[], T]) -> None:
        self._load = load
        self._lock = threading.Lock()
        self._value: T
        self._loaded = False

    @property
    def loaded(self) -> bool:
        """True once a load has finished (without waiting for one in progress)."""
        return self._loaded

    def get(self) -> T:
        if self._loaded:  # the common case, after the first request: no lock to take
            return self._value
        with self._lock:
            if not self._loaded:
                self._value = self._load()
                self._loaded = True
            return self._value
