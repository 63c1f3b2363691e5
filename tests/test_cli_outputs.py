"""What the command line writes, run in-process (`cli.main`): no output replaces a file that
lpips-fast did not write, stdout carries results only, `-o -` / `-o /dev/null`, a full disk
mid-CSV, the summary's lock. A subprocess only where the process itself is under test (a file
size limit)."""
import json
import os
import resource
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lpips_fast import cli, jobs, model as model_mod
from lpips_fast.jobs import outputs as outputs_mod

CPU = ("--device", "cpu")
JOB = ("-q", "--workers", "0", *CPU)


def image(path, seed, size=(32, 32)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def folders(tmp_path, names):
    d0, d1 = tmp_path / "ref", tmp_path / "dist"
    d0.mkdir(), d1.mkdir()
    for k, name in enumerate(names):
        image(d0 / name, 2 * k), image(d1 / name, 2 * k + 1)
    return d0, d1


def main(capsys, *args):
    """cli.main in this process: (exit code, stdout, stderr)."""
    rc = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def refused(result, *needles):
    rc, out, err = result
    assert rc == 2 and out == "", result
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- one rule for every output: a file lpips-fast did not write is not replaced ---------------

def test_no_output_replaces_a_file_lpips_fast_did_not_write(tmp_path, capsys):
    """`pair --spatial-map` onto a user's file and `demo --save` into a folder holding files of
    its names overwrote them silently (-o and --summary were refused already): every output now
    goes through jobs.refuse_foreign_files."""
    a, b = image(tmp_path / "a.png", 0), image(tmp_path / "b.png", 1)
    photo = image(tmp_path / "photo.png", 2)         # a user's PNG (no lpips-fast mark)
    values = tmp_path / "values.npy"
    np.save(values, np.random.default_rng(3).random((4, 4)))  # a .npy carries no mark
    notes = tmp_path / "notes.csv"
    notes.write_text("my notes\n")
    demo = tmp_path / "demo"
    demo.mkdir()
    image(demo / "blur_r1.png", 4)                   # one of demo's names, a user's image
    d0, d1 = folders(tmp_path, ["x.png"])
    before = snapshot(tmp_path)
    for args, needle in [
            (("pair", a, b, "--spatial-map", photo), "photo.png: exists and is not a PNG"),
            (("pair", a, b, "--spatial-map", values), "values.npy: exists and may not have"),
            (("demo", "--save", demo), "blur_r1.png: exists and is not a PNG"),
            (("dirs", d0, d1, "-o", notes, *JOB), "notes.csv: exists and is not an lpips"),
            (("dirs", d0, d1, "--summary", notes, "-o", tmp_path / "o.csv", *JOB),
             "notes.csv: exists and is not an lpips-fast summary")]:
        refused(main(capsys, *args, *CPU), needle, "refusing to overwrite it")
    assert snapshot(tmp_path) == before


def test_a_rerun_replaces_its_own_outputs(tmp_path, capsys):
    """What lpips-fast wrote is replaced by the same command run again: its PNGs carry a mark
    (the text chunk Software=lpips-fast), its CSVs and summaries are known by their content."""
    a, b = image(tmp_path / "a.png", 0), image(tmp_path / "b.png", 1)
    d0, d1 = folders(tmp_path, ["x.png"])
    for args in [("pair", a, b, "--spatial-map", tmp_path / "m.png"),
                 ("demo", "--save", tmp_path / "demo"),
                 ("dirs", d0, d1, "-o", tmp_path / "o.csv", *JOB)]:
        for _ in range(2):
            rc, out, err = main(capsys, *args, *CPU)
            assert rc == 0, err
    assert Image.open(tmp_path / "m.png").info["Software"] == "lpips-fast"
    assert all(Image.open(p).info["Software"] == "lpips-fast"
               for p in (tmp_path / "demo").iterdir())


# --- stdout carries only results ---------------------------------------------------------------

def test_what_a_library_prints_while_models_are_built_is_not_on_stdout(tmp_path, capsys,
                                                                        monkeypatch):
    real = model_mod.resolve_backbone

    def chatty(*args, **kwargs):
        print("Loading weights, please wait...")  # as a library might
        return real(*args, **kwargs)
    monkeypatch.setattr(model_mod, "resolve_backbone", chatty)
    a, b = image(tmp_path / "a.png", 0), image(tmp_path / "b.png", 1)
    rc, out, err = main(capsys, "pair", a, b, "--json", *CPU)
    assert rc == 0, err
    assert json.loads(out)["lpips"] > 0 and "Loading weights" in err
    d0, d1 = folders(tmp_path, ["x.png", "y.png"])
    rc, out, err = main(capsys, "dirs", d0, d1, *JOB)
    assert rc == 0, err
    assert out.startswith("name,lpips\n") and len(out.splitlines()) == 3, out
    assert "Loading weights" in err


# What reaches file descriptor 1 without Python's sys.stdout (a C library's printf, torch's own
# logging, a child process) is only visible in a real process: the fd itself is under test.
FD1_NOISE = """
import os, sys
from lpips_fast import cli, model
real = model.resolve_backbone
def noisy(*a, **k):
    os.write(1, b"written to fd 1 by a library\\n")
    return real(*a, **k)
model.resolve_backbone = noisy
sys.exit(cli.main(sys.argv[1:]))
"""


def test_what_a_library_writes_to_fd_1_is_not_on_stdout(tmp_path):
    a, b = image(tmp_path / "a.png", 0), image(tmp_path / "b.png", 1)
    p = subprocess.run([sys.executable, "-c", FD1_NOISE, "pair", str(a), str(b), "--json", *CPU],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["lpips"] > 0, p.stdout
    assert "written to fd 1 by a library" in p.stderr


# --- -o - and -o /dev/null ---------------------------------------------------------------------

def test_dash_output_is_stdout_and_no_file(tmp_path, capsys, monkeypatch):
    d0, d1 = folders(tmp_path, ["x.png", "y.png"])
    monkeypatch.chdir(tmp_path)
    rc, out, err = main(capsys, "dirs", d0, d1, "-o", "-", *JOB)
    assert rc == 0, err
    assert out.startswith("name,lpips\nx.png,") and len(out.splitlines()) == 3, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist", "ref"]


def test_no_summary_beside_a_device(tmp_path, capsys):
    """-o /dev/null wrote /dev/null.summary.json (as root): no summary is made beside an output
    that is not a regular file (here a link to /dev/null, whose folder is the test's)."""
    d0, d1 = folders(tmp_path, ["x.png"])
    null = tmp_path / "null.csv"
    null.symlink_to(os.devnull)
    rc, out, err = main(capsys, "dirs", d0, d1, "-o", null, *JOB)
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist", "null.csv", "ref"]
    assert "summary ->" not in out
    # --summary onto a device is written to, not replaced by a rename (which replaced the link
    # here, and /dev/null itself as root)
    rc, out, err = main(capsys, "dirs", d0, d1, "-o", tmp_path / "o.csv", "--summary", null, *JOB)
    assert rc == 0, err
    assert null.is_symlink() and os.path.samefile(null, os.devnull)


# --- a full disk mid-CSV -----------------------------------------------------------------------

def test_a_full_disk_mid_csv_keeps_the_rows_and_says_one_line(tmp_path, capsys):
    """A file size limit (RLIMIT_FSIZE: EFBIG, as ENOSPC on a full disk) reached in the middle
    of the CSV: exit 1, one line naming the file and the error, the rows written are kept, and
    --resume then gives the bytes of an uninterrupted run."""
    names = [f"{k:02d}{'x' * 190}.png" for k in range(24)]  # rows of ~210 bytes
    d0, d1 = folders(tmp_path, names)
    jobs.make_model(jobs.Settings(), "cpu")  # the weight cache exists before the limit
    out = tmp_path / "o.csv"
    limit = 2000  # the summary (~1 KB) fits; the CSV (~5 KB) stops in its 3rd batch of 4 rows

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    args = ["dirs", d0, d1, "-o", out, "--batch-size", "4", *JOB]
    p = subprocess.run([sys.executable, "-m", "lpips_fast", *map(str, args)],
                       capture_output=True, text=True, preexec_fn=limited, timeout=300)
    assert p.returncode == 1, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    assert f"writing {out} failed: File too large" in p.stderr
    assert "the 8 new rows written" in p.stderr and "--resume" in p.stderr
    kept = out.read_bytes()  # the 8 rows said, and what fitted of the 3rd batch's
    assert len(kept) == limit and kept.count(b"\n") >= 9
    assert json.loads((tmp_path / "o.summary.json").read_text())["complete"] is False
    rc, _, err = main(capsys, *args, "--resume")
    assert rc == 0, err
    rc, _, err = main(capsys, "dirs", d0, d1, "-o", tmp_path / "whole.csv", *JOB)
    assert rc == 0, err
    whole = (tmp_path / "whole.csv").read_bytes()
    assert whole.startswith(kept) and out.read_bytes() == whole


# --- the summary is locked like the CSV --------------------------------------------------------

def test_a_summary_another_run_is_writing_is_refused_untouched(tmp_path, capsys):
    """Two runs with other -o and one --summary replaced each other's record. Here the test
    holds the lock, as another run would."""
    fcntl = pytest.importorskip("fcntl")
    d0, d1 = folders(tmp_path, ["x.png"])
    summary = tmp_path / "s.json"
    assert main(capsys, "dirs", d0, d1, "-o", tmp_path / "a.csv", "--summary", summary, *JOB)[0] == 0
    before = snapshot(tmp_path)
    with open(summary, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        refused(main(capsys, "dirs", d0, d1, "-o", tmp_path / "b.csv", "--summary", summary,
                     *JOB), "s.json: another lpips-fast run is writing this file")
    assert snapshot(tmp_path) == before
    assert main(capsys, "dirs", d0, d1, "-o", tmp_path / "b.csv", "--summary", summary,
                *JOB)[0] == 0  # released after each run, also after a refused one


def test_the_summary_stays_locked_while_it_is_replaced(tmp_path, capsys, monkeypatch):
    """The summary is replaced by a rename (whole or not at all): the new file is locked before
    it takes the name, so another run finds it locked at every moment of the run, new or not."""
    fcntl = pytest.importorskip("fcntl")
    d0, d1 = folders(tmp_path, ["x.png", "y.png", "z.png"])
    summary = tmp_path / "s.json"
    seen = []
    real = outputs_mod.CsvOutput.write

    def probing(self, rows):  # between two rows: the summary was written (incomplete) already
        with open(summary, "rb") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen.append("free")
            except BlockingIOError:
                seen.append("locked")
        return real(self, rows)
    monkeypatch.setattr(outputs_mod.CsvOutput, "write", probing)
    for _ in range(2):  # a new summary, then one replaced
        rc, _, err = main(capsys, "dirs", d0, d1, "-o", tmp_path / "a.csv", "--summary",
                          summary, "--batch-size", "1", *JOB)
        assert rc == 0, err
    assert seen == ["locked"] * 6
