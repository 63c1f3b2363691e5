"""Image loading for scoring: files to N x 3 x H x W float32 tensors in [-1, 1].

Pillow reads PNG, JPEG, BMP, TIFF, WebP (and whatever else it knows). Whatever the file holds,
the result is RGB in [-1, 1]:

- the EXIF orientation is applied first (a portrait phone photo is scored upright);
- grayscale (L, 1, I;16...) is repeated into R, G and B; palette and CMYK/YCbCr/LAB images are
  converted to RGB;
- an alpha channel is dropped (not composited), with a note: LPIPS scores colour only;
- 8-bit values are scaled by 255, 16-bit ones (modes I;16, I;16B, I;16L, and I, which Pillow
  uses for 16-bit PNG/TIFF) by their true range 65535, float images (mode F) are taken as [0, 1].
  Pillow reads 16-bit *colour* PNG/TIFF at 8-bit precision (the range is still right).
  Where the data contradict the format's convention, the data decide, with a note saying so
  (`value_scale`): a float image whose values exceed 1 holds 0..255 (or 0..65535) values, a
  16-bit image whose values never exceed 255 holds 8-bit values. A float image with values
  beyond 65535, NaN or infinity is an ImageError; negative values are clipped to 0 (noted).

Every problem is an `ImageError` (a ValueError) whose message starts with the file's path.
"""
from __future__ import annotations

import stat
import sys
from pathlib import Path

import numpy as np
import torch

SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
ALPHA = {"RGBA", "LA", "PA", "La", "RGBa"}
RESIZE_POLICIES = ("none", "to-first", "to-smaller")
RESAMPLE = ("bicubic", "bilinear")


class ImageError(ValueError):
    """A file that cannot be scored; str() is one line that names the file."""


_noted: set = set()


def note_once(kind: str, message: str) -> None:
    """Print a note to stderr once per kind and process."""
    if kind not in _noted:
        _noted.add(kind)
        print(f"note: {message}", file=sys.stderr)


def alpha_note(path) -> str:
    return (f"{path} has an alpha channel; it is dropped (LPIPS scores RGB only; "
            "further such notes are not shown)")


def _open(path: Path):
    """Open (header only) with Pillow, turning every failure into one ImageError line."""
    from PIL import Image, UnidentifiedImageError
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot read ({e.strerror})") from None
    if stat.S_ISDIR(mode):
        raise ImageError(f"{path}: is a directory, not an image")
    if not stat.S_ISREG(mode):  # opening a named pipe blocks until a writer comes: never
        kind = ("a named pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device")
        raise ImageError(f"{path}: is {kind}, not a regular file; it is not read")
    try:
        return Image.open(path)
    except PermissionError:
        raise ImageError(f"{path}: permission denied") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can read (unknown or corrupt format)") \
            from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: cannot open image ({e})") from None


def image_size(path) -> tuple[int, int]:
    """(H, W) after the EXIF orientation, reading the header only."""
    path = Path(path)
    with _open(path) as img:
        w, h = img.size
        try:
            orientation = img.getexif().get(0x0112, 1)
        except Exception:  # noqa: BLE001 - a broken EXIF block is not worth failing over
            orientation = 1
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def read_image(path) -> tuple[np.ndarray, bool]:
    """The file as an H x W x 3 float32 array in [-1, 1], and whether alpha was dropped."""
    path = Path(path)
    return _decoded(path, lambda img: pil_to_array(img, path))


def read_into(path, out: np.ndarray):
    """Decode the file straight into `out` (an H x W x 3 float32 array, e.g. a batch slot) if
    its upright size is out's: returns (True, whether alpha was dropped); else (False, what
    read_image returns), for the caller to resize."""
    path = Path(path)

    def into(img):
        img = upright(img)
        if img.size != (out.shape[1], out.shape[0]):
            return False, pil_to_array(img, path)
        return True, pil_into(img, out, path)
    return _decoded(path, into)


def _decoded(path: Path, use):
    """use(the decoded Pillow image) with every failure turned into one ImageError line."""
    from PIL import Image
    img = _open(path)
    if getattr(img, "n_frames", 1) > 1:  # Pillow reads frame 0 unless told otherwise
        note_once("frames", f"{path} has {img.n_frames} frames (an animation or a multi-page "
                            "file); the first is scored (further such notes are not shown)")
    try:
        with img:
            img.load()
            return use(img)
    except ImageError:
        raise
    except PermissionError:
        raise ImageError(f"{path}: permission denied") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: corrupt or truncated image ({e})") from None


def value_scale(a: np.ndarray, mode: str, name) -> float:
    """The value that stands for full white in a 16-bit or float image: its format's convention
    (65535; 1.0) unless the data contradict it, then the data's (with a note: it is a guess)."""
    top = float(a.max()) if a.size else 0.0
    if mode == "F":
        if not np.isfinite(a).all() or top > 65535:
            raise ImageError(f"{name}: a float image with values up to {top:g} (or NaN/inf): "
                             "not 0..1, 0..255 or 0..65535, so its white is unknown")
        if a.size and float(a.min()) < 0:
            note_once("negative", f"{name}: negative values in a float image are clipped to 0 "
                                  "(further such notes are not shown)")
        scale = 1.0 if top <= 1 else 255.0 if top <= 255 else 65535.0
        convention = 1.0
    else:
        scale = 255.0 if top <= 255 else 65535.0
        convention = 65535.0
    if scale != convention and top > 0:  # (all black: the same whatever the scale)
        note_once(f"range{mode}", f"{name}: a {'float' if mode == 'F' else '16-bit'} image "
                                  f"with values up to {top:g} is read as 0..{scale:g} (a guess "
                                  "from the data; further such notes are not shown)")
    return scale


def upright(img):
    """The image with its EXIF orientation applied (unreadable EXIF: as stored)."""
    from PIL import ImageOps
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - unreadable EXIF: keep the stored orientation
        return img


def pil_into(img, out: np.ndarray, name="image") -> bool:
    """Write an upright Pillow image (any mode) into `out`, an H x W x 3 float32 array (a view
    of a batch tensor's slot: no intermediate float image), in [-1, 1]; return whether alpha
    was dropped. 8-bit data go from the decoder's uint8 buffer to `out` in one division."""
    mode = img.mode
    had_alpha = mode in ALPHA or (mode == "P" and "transparency" in img.info)
    if mode in SIXTEEN_BIT or mode == "F":
        a = np.asarray(img).astype(np.float32)
        scale = value_scale(a, mode, name)
        np.clip(a, 0, scale, out=a)
        np.divide(a, np.float32(scale / 2), out=a)
    else:
        if mode in ("RGBA", "RGBa"):
            img = img.convert("RGBA")
        elif mode not in ("RGB", "L"):  # L: its one channel is R, G and B (as Pillow's RGB)
            img = img.convert("RGBA" if had_alpha else "RGB")
        a = np.asarray(img)
        a = a[..., :3] if a.ndim == 3 else a
        a = np.divide(a, np.float32(127.5), dtype=np.float32,
                      out=out if a.ndim == 3 else None)
    if a is not out:
        out[...] = a[..., None] if a.ndim == 2 else a
    np.subtract(out, np.float32(1), out=out)
    return had_alpha


def pil_to_array(img, name="image") -> tuple[np.ndarray, bool]:
    """A Pillow image (any mode) as H x W x 3 float32 in [-1, 1], and whether alpha was dropped.
    `name` (the file) is what notes and errors say."""
    img = upright(img)
    out = np.empty((img.size[1], img.size[0], 3), np.float32)
    return out, pil_into(img, out, name)


def load_image(path) -> torch.Tensor:
    """Read an image with Pillow as a 1 x 3 x H x W float32 tensor in [-1, 1].

    See the module docstring for modes, EXIF orientation and alpha (a note goes to stderr
    once); errors are `ImageError`s naming the file.
    """
    a, had_alpha = read_image(path)
    if had_alpha:
        note_once("alpha", alpha_note(path))
    return torch.from_numpy(a).permute(2, 0, 1).unsqueeze(0)


def to_tensor(img) -> torch.Tensor:
    """A Pillow image (any mode) as a 1 x 3 x H x W float32 tensor in [-1, 1]."""
    a, _ = pil_to_array(img)
    return torch.from_numpy(a).permute(2, 0, 1).unsqueeze(0)


def check_scoring_size(path0, size0, path1, size1, size, net: str) -> None:
    """Raise an ImageError if a pair scored at `size` (H, W), after any --resize, is below
    what `net` can score. Checked after resizing, not per file: to-first can enlarge a small
    second image to a scorable size, and to-smaller can shrink two scorable ones below it."""
    from .backbones import too_small
    problem = too_small(net, *size)
    if problem is None:
        return
    if tuple(size0) == tuple(size1) == tuple(size):
        raise ImageError(f"{path0}: {problem}")
    raise ImageError(f"{path0} and {path1}, resized to {size[1]} x {size[0]} (W x H): "
                     f"{problem}")


def target_size(size0, size1, policy: str):
    """The (H, W) both images are scored at under a --resize policy, or None if they can't be."""
    if tuple(size0) == tuple(size1):
        return tuple(size0)
    if policy == "to-first":
        return tuple(size0)
    if policy == "to-smaller":
        return (min(size0[0], size1[0]), min(size0[1], size1[1]))
    return None


def mismatch_message(name0, size0, name1, size1, option: str = "--resize {}") -> str:
    """`option` spells the resize setting where the caller is (the CLI's flag by default;
    Python callers pass "resize='{}'")."""
    return (f"{name0} is {size0[1]} x {size0[0]} but {name1} is {size1[1]} x {size1[0]} "
            f"(W x H): LPIPS compares images of one size; pass {option.format('to-first')} or "
            f"{option.format('to-smaller')} to resample")


def resize(x: torch.Tensor, size, resample: str = "bicubic") -> torch.Tensor:
    """Resize an N x 3 x H x W (or 3 x H x W) tensor in [-1, 1] to (H, W), antialiased."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    squeeze = x.dim() == 3
    x = x.unsqueeze(0) if squeeze else x
    y = torch.nn.functional.interpolate(x, size=tuple(size), mode=resample, align_corners=False,
                                        antialias=True).clamp_(-1, 1)
    return y.squeeze(0) if squeeze else y


def load_pair(path0, path1, policy: str = "none", resample: str = "bicubic", net: str = "alex",
              option: str = "--resize {}"):
    """Two image files as 1 x 3 x H x W float32 tensors in [-1, 1] at the size they are scored
    at under a --resize `policy`, and the files' own (H, W) sizes. A size mismatch under 'none',
    or a scoring size too small for `net`, is an ImageError naming both files and sizes."""
    if policy not in RESIZE_POLICIES:
        raise ValueError(f"resize must be one of {RESIZE_POLICIES}, got {policy!r}")
    if resample not in RESAMPLE:
        raise ValueError(f"resample must be one of {RESAMPLE}, got {resample!r}")
    x0, x1 = load_image(path0), load_image(path1)
    s0, s1 = tuple(x0.shape[2:]), tuple(x1.shape[2:])
    size = target_size(s0, s1, policy)
    if size is None:
        raise ImageError(mismatch_message(path0, s0, path1, s1, option))
    check_scoring_size(path0, s0, path1, s1, size, net)
    return resize(x0, size, resample), resize(x1, size, resample), (s0, s1)
