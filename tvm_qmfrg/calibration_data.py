"""Calibration and validation samples from files: ``.npy``, ``.npz`` or a folder of images.

:func:`load_samples` reads what ``--calibration`` and ``--validate`` name and returns one
array per model input, ``{input name: array of shape (N, *input_shape[1:])}``: the leading
axis counts the samples, the other dims are the model input's without its batch dim (the pass
and the validation run them in batches of the model's static batch size themselves).

Formats

- ``FILE.npy``: one array, for a model with exactly one input.
- ``FILE.npz``: one array per model input, keyed by input name; every input must be present
  and every key must name an input.
- ``FOLDER/``: the images in it (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``; sorted by file
  name; other files and sub-folders are ignored), for a model with one 4-D input; needs a
  preprocessing spec (``--preprocess``).

Arrays must have the sample axis, also for a single sample (``x[None]``). They are cast to
the input's dtype; float data for an integer input is refused (nothing is rounded), and so
are integers out of the input dtype's range, NaN and Inf.

Preprocessing spec (:func:`parse_preprocess`), comma-separated ``key=value`` items, each key
at most once, keys in any order::

    size=N | size=HxW            image height and width after resizing
                                 (default: the model input's)
    resize=stretch | shorter     stretch: resize to HxW, aspect ratio not kept (default);
                                 shorter: scale so the image covers HxW (a square size: the
                                 shorter side to N), then crop the center
    channels=RGB | BGR | GRAY    channel order fed to the model
                                 (default: GRAY for a 1-channel input, RGB for 3 channels)
    scale=F | scale=A/B          pixel values (0..255) are multiplied by it first (default 1)
    mean=M | mean=M1/M2/M3       then subtracted (default 0)
    std=S | std=S1/S2/S3         then divided by (default 1)
    layout=NCHW | NHWC           where the channel axis is in the model input (default NCHW)

So each value fed is ``(pixel * scale - mean[c]) / std[c]``. Per-channel ``mean``/``std``
are slash-separated, one per channel in the order of ``channels`` (``channels=BGR``: blue
first). Examples: ``size=224,mean=127.5,std=127.5`` (to [-1, 1]);
``size=224,resize=shorter,mean=123.675/116.28/103.53,std=58.395/57.12/57.375`` (ImageNet);
``scale=1/255,channels=GRAY`` (to [0, 1]). Images are turned upright by their EXIF
orientation, converted to the channels (Pillow's ``convert``) and resized bilinearly.
An integer model input takes images only unscaled (no ``scale``, ``mean`` or ``std``).

Every error is an :class:`~tvm_qmfrg.errors.OptionError` of one line naming the flag, the
file and the reason. Numpy only at import; Pillow is imported when a folder is read.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from .errors import OptionError, one_line

IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png")
PREPROCESS_KEYS = ("size", "resize", "channels", "scale", "mean", "std", "layout")
EXAMPLE_SPEC = "size=224,mean=127.5,std=127.5,layout=NCHW,channels=RGB"

# one model input: (static shape incl. the batch dim, numpy dtype)
InputSpec = tuple[Sequence[int], "np.typing.DTypeLike"]


@dataclass(frozen=True)
class Preprocess:
    """A parsed preprocessing spec (see the module doc); ``None`` fields default from the
    model input."""

    size: tuple[int, int] | None = None
    resize: str = "stretch"
    channels: str | None = None
    scale: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "NCHW"

    @property
    def identity(self) -> bool:
        """Whether pixel values go in unchanged (no scale, mean or std)."""
        return self.scale == 1.0 and set(self.mean) == {0.0} and set(self.std) == {1.0}


def parse_preprocess(spec: str, *, flag: str = "--preprocess") -> Preprocess:
    """Parse ``size=224,mean=127.5,std=127.5,...`` (grammar in the module doc)."""
    text = spec.strip()
    if not text:
        raise OptionError(f"{flag} is empty; give at least one key=value, e.g. {EXAMPLE_SPEC}")
    seen: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not sep or not key or not value:
            raise OptionError(f"{flag} '{spec}': '{item.strip()}' is not key=value")
        if key not in PREPROCESS_KEYS:
            raise OptionError(
                f"{flag} '{spec}': unknown key '{key}' (keys: {', '.join(PREPROCESS_KEYS)})"
            )
        if key in seen:
            raise OptionError(f"{flag} '{spec}': key '{key}' is given twice")
        seen[key] = value

    def bad(key: str, want: str) -> OptionError:
        return OptionError(f"{flag} '{spec}': {key}={seen[key]}: {want}")

    fields: dict = {}
    if "size" in seen:
        parts = seen["size"].lower().split("x")
        if len(parts) > 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise bad("size", "must be N or HxW (positive integers)")
        h, w = (int(parts[0]), int(parts[-1]))
        fields["size"] = (h, w)
    for key, choices in (
        ("resize", ("stretch", "shorter")),
        ("channels", ("RGB", "BGR", "GRAY")),
        ("layout", ("NCHW", "NHWC")),
    ):
        if key in seen:
            value = seen[key].upper() if key != "resize" else seen[key].lower()
            if value not in choices:
                raise bad(key, f"choose from {', '.join(choices)}")
            fields[key] = value
    if "scale" in seen:
        try:
            scale = float(Fraction(seen["scale"].replace(" ", "")))
        except (ValueError, ZeroDivisionError):
            raise bad("scale", "must be a number or a fraction A/B") from None
        if not np.isfinite(scale) or scale <= 0:
            raise bad("scale", "must be > 0")
        fields["scale"] = scale
    for key in ("mean", "std"):
        if key in seen:
            try:
                values = tuple(float(v) for v in seen[key].split("/"))
            except ValueError:
                raise bad(key, "must be one number or one per channel, slash-separated") from None
            if len(values) not in (1, 3):
                raise bad(key, "must be one number or three (one per channel)")
            if not all(np.isfinite(v) for v in values):
                raise bad(key, "must be finite")
            if key == "std" and any(v <= 0 for v in values):
                raise bad(key, "must be > 0")
            fields[key] = values
    pre = Preprocess(**fields)
    n = {"RGB": 3, "BGR": 3, "GRAY": 1}.get(pre.channels or "", None)
    for key in ("mean", "std"):
        if n is not None and len(getattr(pre, key)) not in (1, n):
            raise bad(key, f"has {len(getattr(pre, key))} values, channels={pre.channels} has {n}")
    return pre


def load_samples(
    path: str | os.PathLike,
    inputs: dict[str, InputSpec],
    preprocess: Preprocess | str | None = None,
    *,
    flag: str = "--calibration",
) -> dict[str, np.ndarray]:
    """The samples in ``path`` by input name, each ``(N, *shape[1:])`` in the input's dtype.

    ``inputs`` maps every model input to ``(static shape incl. the batch dim, dtype)``;
    ``preprocess`` (a :class:`Preprocess` or its spec) is for a folder of images and only for
    one; ``flag`` names the option in messages.
    """
    path = os.fspath(path)
    where = f"{flag} {path}"
    if isinstance(preprocess, str):
        preprocess = parse_preprocess(preprocess)
    if not os.path.exists(path):
        raise OptionError(f"{where}: no such file or folder")
    if os.path.isdir(path):
        if preprocess is None:
            raise OptionError(
                f"{where}: a folder of images needs --preprocess (e.g. {EXAMPLE_SPEC})"
            )
        arrays = _load_images(path, inputs, preprocess, where)
    else:
        if preprocess is not None:
            raise OptionError(f"{where}: --preprocess is for a folder of images, not a file")
        suffix = os.path.splitext(path)[1].lower()
        if suffix == ".npy":
            arrays = _load_npy(path, inputs, where)
        elif suffix == ".npz":
            arrays = _load_npz(path, inputs, where)
        else:
            raise OptionError(
                f"{where}: unknown format '{suffix or path}' (give a .npy or .npz file, or a "
                "folder of images)"
            )
    return _checked(arrays, inputs, where)


def sample_count(samples: dict[str, np.ndarray]) -> int:
    """How many samples ``samples`` (from :func:`load_samples`) holds."""
    return int(next(iter(samples.values())).shape[0]) if samples else 0


def _load_npy(path: str, inputs: dict[str, InputSpec], where: str) -> dict[str, np.ndarray]:
    if len(inputs) != 1:
        raise OptionError(
            f"{where}: a .npy file holds one array, but the model has {len(inputs)} inputs "
            f"({', '.join(inputs)}); use a .npz with one array per input name"
        )
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise OptionError(f"{where}: not a readable .npy file ({one_line(exc)})") from exc
    if not isinstance(array, np.ndarray):
        array.close()
        raise OptionError(f"{where}: not a .npy file (it holds several arrays: name it .npz)")
    return {next(iter(inputs)): array}


def _load_npz(path: str, inputs: dict[str, InputSpec], where: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise OptionError(f"{where}: not a .npz archive (it holds one array: name it .npy)")
            keys = list(archive.files)
            missing = [k for k in inputs if k not in keys]
            if missing:
                raise OptionError(
                    f"{where}: no array for input(s) {_names(missing)} (the file has: "
                    f"{_names(keys) or 'no arrays'})"
                )
            extra = [k for k in keys if k not in inputs]
            if extra:
                raise OptionError(
                    f"{where}: array(s) {_names(extra)} name no model input (the inputs are: "
                    f"{_names(inputs)})"
                )
            return {k: archive[k] for k in inputs}
    except OptionError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise OptionError(f"{where}: not a readable .npz file ({one_line(exc)})") from exc


def _checked(
    arrays: dict[str, np.ndarray], inputs: dict[str, InputSpec], where: str
) -> dict[str, np.ndarray]:
    """Shapes, dtypes and values checked; every array cast to its input's dtype."""
    out: dict[str, np.ndarray] = {}
    for name, (shape, dtype) in inputs.items():
        array, dtype = arrays[name], np.dtype(dtype)
        want = tuple(int(d) for d in shape[1:])
        if array.ndim != len(want) + 1 or tuple(array.shape[1:]) != want:
            hint = (
                "; the leading axis must count the samples (one sample: add it, x[None])"
                if tuple(array.shape) == want
                else ""
            )
            raise OptionError(
                f"{where}: input '{name}' takes samples of shape {_shape(('N', *want))}, the "
                f"array has shape {_shape(array.shape)}{hint}"
            )
        if array.shape[0] == 0:
            raise OptionError(f"{where}: input '{name}': the array holds no samples")
        out[name] = _cast(array, dtype, name, where)
    counts = {name: a.shape[0] for name, a in out.items()}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"'{k}' {n}" for k, n in counts.items())
        raise OptionError(f"{where}: the inputs have different sample counts ({listed})")
    return out


def _cast(array: np.ndarray, dtype: np.dtype, name: str, where: str) -> np.ndarray:
    kind = array.dtype.kind
    if kind not in "biuf" or dtype.kind not in "biuf":
        raise OptionError(
            f"{where}: input '{name}' is {dtype}, the array is {array.dtype}: not numbers"
        )
    if kind == "f" and dtype.kind != "f":
        raise OptionError(
            f"{where}: input '{name}' is {dtype}, the array is {array.dtype} (floats are not "
            "rounded: cast the data to integers yourself)"
        )
    if dtype.kind == "b" and kind != "b":
        raise OptionError(f"{where}: input '{name}' is bool, the array is {array.dtype}")
    if dtype.kind in "iu" and kind in "iu":
        info = np.iinfo(dtype)
        lo, hi = int(array.min()), int(array.max())
        if lo < info.min or hi > info.max:
            raise OptionError(
                f"{where}: input '{name}' is {dtype}, the array's values [{lo}, {hi}] do not fit"
            )
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray(array.astype(dtype, copy=False))
    if dtype.kind == "f":
        bad = ~np.isfinite(out)
        if bad.any():
            first = int(np.flatnonzero(bad.reshape(out.shape[0], -1).any(axis=1))[0])
            raise OptionError(
                f"{where}: input '{name}' holds {int(bad.sum())} NaN/Inf value(s) (as {dtype}; "
                f"first in sample {first})"
            )
    return out


def _load_images(
    folder: str, inputs: dict[str, InputSpec], pre: Preprocess, where: str
) -> dict[str, np.ndarray]:
    if len(inputs) != 1 or len(next(iter(inputs.values()))[0]) != 4:
        have = ", ".join(f"'{k}' {_shape(s)}" for k, (s, _) in inputs.items())
        raise OptionError(
            f"{where}: a folder of images needs a model with one 4-D image input; it has {have}"
        )
    ((name, (shape, dtype)),) = inputs.items()
    dtype = np.dtype(dtype)
    c_axis, hw = (1, (2, 3)) if pre.layout == "NCHW" else (3, (1, 2))
    n_channels = int(shape[c_axis])
    channels = pre.channels or {1: "GRAY", 3: "RGB"}.get(n_channels)
    if channels is None:
        raise OptionError(
            f"{where}: input '{name}' {_shape(shape)} has {n_channels} channels at axis "
            f"{c_axis} (layout {pre.layout}); images give 1 or 3"
            + ("; set layout=NHWC?" if pre.layout == "NCHW" and shape[3] in (1, 3) else "")
        )
    want_c = 1 if channels == "GRAY" else 3
    size = pre.size or (int(shape[hw[0]]), int(shape[hw[1]]))
    model_sample = tuple(int(d) for d in shape[1:])
    got = (want_c, *size) if pre.layout == "NCHW" else (*size, want_c)
    if got != model_sample:
        raise OptionError(
            f"{where}: --preprocess gives input '{name}' samples of shape {_shape(got)} "
            f"(layout {pre.layout}, channels {channels}, size {size[0]}x{size[1]}), the model "
            f"wants {_shape(model_sample)}"
        )
    for key in ("mean", "std"):
        if len(getattr(pre, key)) not in (1, want_c):
            raise OptionError(
                f"{where}: --preprocess {key} has {len(getattr(pre, key))} values, "
                f"channels={channels} has {want_c}"
            )
    if dtype.kind != "f":
        if dtype.kind not in "iu" or np.iinfo(dtype).min > 0 or np.iinfo(dtype).max < 255:
            raise OptionError(f"{where}: input '{name}' is {dtype}: it cannot hold pixels 0..255")
        if not pre.identity:
            raise OptionError(
                f"{where}: input '{name}' is {dtype}: images go into it unscaled only (drop "
                "scale, mean and std from --preprocess)"
            )
    files = sorted(
        e
        for e in os.listdir(folder)
        if not e.startswith(".")
        and e.lower().endswith(IMAGE_SUFFIXES)
        and os.path.isfile(os.path.join(folder, e))
    )
    if not files:
        raise OptionError(f"{where}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder")
    try:
        from PIL import Image, ImageOps
    except ImportError as exc:  # pragma: no cover - Pillow is a dependency
        raise OptionError(f"{where}: reading images needs Pillow (pip install Pillow)") from exc

    mean = np.asarray(pre.mean, np.float32)
    std = np.asarray(pre.std, np.float32)
    batch = np.empty((len(files), *size, want_c), np.float32)
    for k, entry in enumerate(files):
        try:
            with Image.open(os.path.join(folder, entry)) as img:
                img = ImageOps.exif_transpose(img)
                img = img.convert("L" if channels == "GRAY" else "RGB")
                img = _resized(img, size, pre.resize, Image)
                pixels = np.asarray(img, np.float32)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise OptionError(f"{where}: cannot read image {entry} ({one_line(exc)})") from exc
        pixels = pixels.reshape(*size, want_c)
        if channels == "BGR":
            pixels = pixels[..., ::-1]
        batch[k] = (pixels * np.float32(pre.scale) - mean) / std
    if pre.layout == "NCHW":
        batch = batch.transpose(0, 3, 1, 2)
    if dtype.kind != "f":
        batch = np.rint(batch)  # unscaled pixels: integers already
    return {name: np.ascontiguousarray(batch.astype(dtype))}


def _resized(img, size: tuple[int, int], mode: str, Image):
    h, w = size
    if mode == "stretch":
        return img.resize((w, h), Image.BILINEAR)
    scale = max(h / img.height, w / img.width)
    rw, rh = max(w, round(img.width * scale)), max(h, round(img.height * scale))
    img = img.resize((rw, rh), Image.BILINEAR)
    left, top = (rw - w) // 2, (rh - h) // 2
    return img.crop((left, top, left + w, top + h))


def _shape(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _names(names) -> str:
    return ", ".join(f"'{n}'" for n in names)
