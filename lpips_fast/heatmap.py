"""Per-pixel LPIPS maps as colour heat map PNGs with a colour scale bar (Pillow + numpy only)."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Matplotlib's "inferno" (perceptually uniform, readable in grayscale), sampled at 9 points.
INFERNO = np.array([
    (0, 0, 4), (31, 12, 72), (85, 15, 109), (136, 34, 106), (186, 54, 85),
    (227, 89, 51), (249, 140, 10), (249, 201, 50), (252, 255, 164)], dtype=np.float32)


def colorize(values: np.ndarray, vmax: float) -> np.ndarray:
    """H x W values in [0, vmax] as H x W x 3 uint8 inferno colours."""
    t = np.clip(np.asarray(values, dtype=np.float32) / max(vmax, 1e-12), 0, 1)
    pos = t * (len(INFERNO) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(INFERNO) - 2)
    frac = (pos - lo)[..., None]
    rgb = INFERNO[lo] * (1 - frac) + INFERNO[lo + 1] * frac
    return rgb.round().astype(np.uint8)


def nice_ticks(vmax: float) -> list[float]:
    """Round values from 0 up to vmax, 3 to 6 of them (steps of 1, 2, 2.5 or 5 times 10^k)."""
    raw = vmax / 4
    mag = 10 ** np.floor(np.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    n = int(np.floor(vmax / step + 1e-9))
    return [float(f"{k * step:.6g}") for k in range(n + 1)]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def render(dmap: np.ndarray, vmax: float | None = None) -> Image.Image:
    """The map (H x W, already at the image's size) in colour, with a scale bar on the right.

    The colours run from 0 to `vmax` (default: the map's maximum); give the same vmax to maps
    that are to be compared with each other.
    """
    dmap = np.asarray(dmap, dtype=np.float32)
    h, w = dmap.shape
    if vmax is None:
        vmax = float(dmap.max())
    vmax = vmax if vmax > 0 else 1e-6
    fs = int(np.clip(h // 14, 9, 22))
    font = _font(fs)
    ticks = nice_ticks(vmax)
    labels = [f"{t:g}" for t in ticks]
    draw_probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(draw_probe.textlength(s, font=font) for s in labels + ["LPIPS"])
    bar_w, pad = max(8, fs), max(4, fs // 2)
    panel_w = int(pad + bar_w + pad // 2 + text_w + pad)
    out = Image.new("RGB", (w + panel_w, h), "white")
    out.paste(Image.fromarray(colorize(dmap, vmax)), (0, 0))
    draw = ImageDraw.Draw(out)
    top, bottom = fs + pad, h - pad - fs // 2
    if bottom - top < 8:  # too small an image for labels: the bar alone, full height
        top, bottom, labels = 2, h - 2, []
    x0 = w + pad
    ramp = np.linspace(vmax, 0, max(bottom - top, 1))[:, None].repeat(bar_w, 1)
    out.paste(Image.fromarray(colorize(ramp, vmax)), (x0, top))
    draw.rectangle([x0 - 1, top - 1, x0 + bar_w, bottom], outline=(0, 0, 0))
    if labels:
        draw.text((x0, top - pad // 2), "LPIPS", fill=(0, 0, 0), font=font, anchor="lb")
        for t, s in zip(ticks, labels):
            y = bottom - 1 - (bottom - top - 1) * t / vmax
            draw.line([x0 + bar_w, y, x0 + bar_w + pad // 2, y], fill=(0, 0, 0))
            draw.text((x0 + bar_w + pad // 2 + 2, y), s, fill=(0, 0, 0), font=font, anchor="lm")
    return out


def map_format(path) -> str:
    """The format a heat map at `path` is written in ("NPY" for raw values), from its suffix
    (any case); a ValueError naming the path where Pillow cannot write that suffix."""
    from pathlib import Path
    suffix = Path(path).suffix.lower()
    if suffix == ".npy":
        return "NPY"
    fmt = Image.registered_extensions().get(suffix)
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(f"{path}: cannot write a heat map as "
                         f"{repr(suffix) if suffix else 'a name without a suffix'}; "
                         "use .png (or .npy for the raw values)")
    return fmt


# The PNG text chunk Software=MARK says lpips-fast wrote a file, which a later run may replace
# (jobs.outputs.refuse_foreign_files); any other existing file is refused.
MARK = "lpips-fast"


def marked(path) -> bool:
    """Whether `path` is a PNG with lpips-fast's mark (reads its first chunks only)."""
    try:
        with Image.open(path) as im:
            return im.format == "PNG" and im.info.get("Software") == MARK
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


def _encode(img: Image.Image, fmt: str) -> bytes:
    """`img` in format `fmt`, marked as lpips-fast's where it is a PNG."""
    import io
    from PIL.PngImagePlugin import PngInfo
    buf = io.BytesIO()
    extra = {}
    if fmt == "PNG":
        extra["pnginfo"] = PngInfo()
        extra["pnginfo"].add_text("Software", MARK)
    img.save(buf, format=fmt, **extra)
    return buf.getvalue()


def _write(path, data: bytes, exclusive: bool = False) -> None:
    with open(path, "xb" if exclusive else "wb") as f:
        f.write(data)


def save_image(img: Image.Image, path) -> None:
    """`img` in `path`'s format (from its suffix), marked where it is a PNG (demo's images)."""
    _write(path, _encode(img, map_format(path)))


def save_map(path, dmap: np.ndarray, vmax: float | None = None, exclusive: bool = False) -> None:
    """A heat map PNG, marked (or, for a .npy path, the raw float32 values). exclusive: an
    existing file is not replaced (FileExistsError)."""
    import io
    fmt = map_format(path)
    # encoded in memory first: a format that refuses the image fails before the file is
    # touched; np.save on a name would add ".npy" to a ".NPY" name and write another file
    if fmt == "NPY":
        buf = io.BytesIO()
        np.save(buf, np.asarray(dmap, dtype=np.float32))
        data = buf.getvalue()
    else:
        try:
            data = _encode(render(dmap, vmax), fmt)
        except (OSError, ValueError, KeyError) as e:  # e.g. XBM takes only 1-bit images
            raise ValueError(f"{path}: cannot write a heat map as {fmt} ({e}); use .png") \
                from None
    _write(path, data, exclusive)
