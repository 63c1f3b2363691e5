"""The official package's image helpers, so that scripts written for `import lpips` run with
`import lpips_fast as lpips`: `load_image`, `im2tensor`, `tensor2im` (the ones its README and
example scripts use), with the same signatures and results.

Two deliberate differences, both where the official code fails or gives a wrong number:
- `load_image` reads with Pillow (lpips_fast.io: EXIF orientation, 16-bit, grey, alpha
  dropped, one-line `ImageError`s naming the file) where the official one calls OpenCV for
  .bmp/.jpg/.jpeg/.png names (a missing file gives a TypeError there) and fails with a
  NameError for any other name. 8-bit files give the same array (tested against the official
  function on PNG and JPEG files); 16-bit files are scaled by 255/65535 and rounded (OpenCV
  divides by 256), so a value may differ by one.
- `tensor2im` clips to the integer type's range before converting: the official one wraps
  values below -1 or above 1 around (-1.5 becomes 193 in uint8).
"""
from __future__ import annotations

import numpy as np
import torch

from .io import read_image


def load_image(path) -> np.ndarray:
    """An image file as an H x W x 3 uint8 RGB array (the official `lpips.load_image`)."""
    a, _ = read_image(path)  # float32 in [-1, 1]: k / 127.5 - 1 for the 8-bit value k
    return np.rint((a + 1) * np.float32(127.5)).astype(np.uint8)


def im2tensor(image, imtype=np.uint8, cent=1., factor=255. / 2.) -> torch.Tensor:
    """H x W x C array (0..255) -> 1 x C x H x W float32 tensor in [-1, 1] by default.

    `imtype` is unused, as in the official function. The arithmetic is the official one's:
    float64 (numpy's promotion of image / factor), then rounded once to float32."""
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"im2tensor takes an H x W x C array (as load_image gives); got shape "
                         f"{tuple(image.shape)}")
    a = image / factor - cent
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)[None])).float()


def tensor2im(image_tensor, imtype=np.uint8, cent=1., factor=255. / 2.) -> np.ndarray:
    """The first image of an N x C x H x W tensor (in [-1, 1] by default) as an H x W x C
    array of `imtype`, clipped to that type's range when it is an integer type."""
    if image_tensor.dim() != 4:
        raise ValueError(f"tensor2im takes an N x C x H x W tensor; got shape "
                         f"{tuple(image_tensor.shape)}")
    a = (image_tensor[0].detach().cpu().float().numpy().transpose(1, 2, 0) + cent) * factor
    if np.issubdtype(imtype, np.integer):
        info = np.iinfo(imtype)
        a = np.clip(a, info.min, info.max)
    return a.astype(imtype)


# --- the rest of the official top level (lpips/__init__.py): array and tensor helpers --------
# The official functions' arithmetic, order and dtypes, so results are equal, not close.
# Deliberate differences: scikit-image is imported only by the functions that need it, with
# an error naming the package (the official ones fail with a bare ModuleNotFoundError);
# `dssim` calls today's `structural_similarity` (the official one imports `compare_ssim`,
# which scikit-image 0.18 deprecated and later removed, so it cannot run at all now);
# `tensorlab2tensor` silences scikit-image's warnings for its own call only (the official
# one turns every warning of the process off).

def normalize_tensor(in_feat: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Each pixel's feature vector divided by its Euclidean norm over channels (+ eps)."""
    norm = torch.sqrt(torch.sum(in_feat ** 2, dim=1, keepdim=True))
    return in_feat / (norm + eps)


def l2(p0, p1, range=255.):  # noqa: A002 - the official keyword
    """Half the mean squared difference of two arrays scaled by `range`."""
    return .5 * np.mean((p0 / range - p1 / range) ** 2)


def psnr(p0, p1, peak=255.):
    """Peak signal-to-noise ratio in dB (inf for identical arrays, as numpy divides)."""
    return 10 * np.log10(peak ** 2 / np.mean((1. * p0 - 1. * p1) ** 2))


def _skimage():
    try:
        import skimage.color
        import skimage.metrics
    except ImportError:
        raise ImportError("this function needs scikit-image: pip install scikit-image "
                          "(or lpips_fast's 'lab' extra)") from None
    return skimage


def dssim(p0, p1, range=255.):  # noqa: A002
    """Structural dissimilarity (1 - SSIM) / 2 of two H x W x C arrays, SSIM as the official
    `compare_ssim(..., multichannel=True)` computed it (7 x 7 uniform windows, the sample
    covariance, channels averaged)."""
    ssim = _skimage().metrics.structural_similarity(p0, p1, data_range=range, channel_axis=-1)
    return (1 - ssim) / 2.


def rgb2lab(input):  # noqa: A002
    """CIELAB of an RGB array in 0..255 (the official module's second, effective definition)."""
    return _skimage().color.rgb2lab(input / 255.)


def tensor2np(tensor_obj) -> np.ndarray:
    """The first image of an N x C x H x W tensor as an H x W x C float32 array."""
    return tensor_obj[0].cpu().float().numpy().transpose((1, 2, 0))


def np2tensor(np_obj) -> torch.Tensor:
    """An H x W x C array as a 1 x C x H x W float32 tensor."""
    return torch.Tensor(np_obj[:, :, :, np.newaxis].transpose((3, 2, 0, 1)))


def tensor2vec(vector_tensor) -> np.ndarray:
    """An N x C x 1 x 1 tensor as an N x C array."""
    return vector_tensor.data.cpu().numpy()[:, :, 0, 0]


def tensor2tensorlab(image_tensor, to_norm=True, mc_only=False) -> torch.Tensor:
    """An image tensor in [-1, 1] as a Lab tensor: L - 50 and / 100 when `to_norm`, only L - 50
    when `mc_only`. Through `tensor2im`, so out-of-range values saturate (see above)."""
    lab = _skimage().color.rgb2lab(tensor2im(image_tensor))
    if mc_only or to_norm:
        lab[:, :, 0] = lab[:, :, 0] - 50
    if to_norm and not mc_only:
        lab = lab / 100.
    return np2tensor(lab)


def tensorlab2tensor(lab_tensor, return_inbnd=False):
    """The inverse of `tensor2tensorlab(..., to_norm=True)`: an image tensor in [-1, 1]; with
    `return_inbnd`, also a 1 x 1 x H x W mask of the pixels whose colour survives the round trip
    through 8-bit RGB within 2 Lab units."""
    import warnings
    color = _skimage().color
    lab = tensor2np(lab_tensor) * 100.
    lab[:, :, 0] = lab[:, :, 0] + 50
    with warnings.catch_warnings():  # lab2rgb warns about out-of-gamut colours it clips
        warnings.simplefilter("ignore")
        rgb_back = 255. * np.clip(color.lab2rgb(lab.astype("float")), 0, 1)
        if not return_inbnd:
            return im2tensor(rgb_back)
        lab_back = color.rgb2lab(rgb_back.astype("uint8"))
    mask = 1. * np.isclose(lab_back, lab, atol=2.)
    return im2tensor(rgb_back), np2tensor(np.prod(mask, axis=2)[:, :, np.newaxis])


def voc_ap(rec, prec, use_07_metric=False) -> float:
    """Average precision from recall and precision arrays (PASCAL VOC): the area under the
    precision envelope, or with `use_07_metric` the mean of the best precision at the 11
    recall levels 0, 0.1, ..., 1 (VOC 2007)."""
    rec, prec = np.asarray(rec), np.asarray(prec)
    if use_07_metric:
        ap = 0.
        for t in np.arange(0., 1.1, 0.1):  # each term divided, then added: the same rounding
            ap += (np.max(prec[rec >= t]) if np.any(rec >= t) else 0) / 11.
        return ap
    r = np.concatenate(([0.], rec, [1.]))
    # the envelope: at each recall, the best precision at that recall or beyond
    p = np.maximum.accumulate(np.concatenate(([0.], prec, [0.]))[::-1])[::-1]
    steps = np.where(r[1:] != r[:-1])[0]
    return np.sum((r[steps + 1] - r[steps]) * p[steps + 1])


def spatial_average(in_tens: torch.Tensor, keepdim=True) -> torch.Tensor:
    """Mean over the two spatial axes."""
    return in_tens.mean([2, 3], keepdim=keepdim)


def upsample(in_tens: torch.Tensor, out_HW=(64, 64)) -> torch.Tensor:  # noqa: N803
    """Bilinear resize to out_HW (align_corners=False), as the spatial maps are resized."""
    return torch.nn.functional.interpolate(in_tens, size=tuple(out_HW), mode="bilinear",
                                           align_corners=False)


def print_network(net) -> None:
    """Print a module and its number of parameters, as the official helper does."""
    print("Network", net)
    print("Total number of parameters: %d" % sum(p.numel() for p in net.parameters()))
