"""The batch-job pipeline (lpips_fast.jobs) as a hostile user meets it: outputs that are inputs,
files that are not our CSV, file names no CSV likes, interrupted and resumed runs, closed pipes,
unwritable folders, devices that are not there. CLI tests run the command (in this process:
helpers.cli; as a real process where only one shows it: a closed pipe, a lock held by another
process) in a temporary folder and compare the files' bytes before and after."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from lpips_fast import jobs
from lpips_fast.folders import UsageError, list_images
from helpers import cli, cli_many, finish, image, one_line_error, spawn, write_video

pytestmark = pytest.mark.slow


def snapshot(folder):
    """Every file under `folder` and its bytes, to prove a refused run changed nothing."""
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def folders_with_sizes(tmp_path, names, sizes=((64, 64), (48, 40))):
    """Two folders of the same names, images alternating between two sizes by name order."""
    d0, d1 = tmp_path / "ref", tmp_path / "dist"
    d0.mkdir(), d1.mkdir()
    for k, name in enumerate(names):
        image(d0 / name, 2 * k, sizes[k % len(sizes)])
        image(d1 / name, 2 * k + 1, sizes[k % len(sizes)])
    return d0, d1


# --- item 3: no output destroys an input; a resumed file is validated before it is touched ----

def test_an_output_that_is_an_input_or_another_output_is_refused_untouched(tmp_path):
    d0, d1 = folders_with_sizes(tmp_path, ["a.png", "b.png"])
    os.link(d1 / "b.png", tmp_path / "hardlink.png")
    (tmp_path / "lnk.png").symlink_to(d0 / "a.png")
    before = snapshot(tmp_path)
    cases = [
        (("dirs", d0, d1, "-o", d0 / "a.png"), "is an input of this run"),
        (("dirs", d0, d1, "-o", tmp_path / "hardlink.png"), "is an input of this run"),
        (("dirs", d0, d1, "-o", tmp_path / "lnk.png"), "is an input of this run"),
        (("dirs", d0, d1, "-o", tmp_path / "o.csv", "--summary", d1 / "b.png"),
         "is an input of this run"),
        (("dirs", d0, d1, "-o", tmp_path / "o.csv", "--summary", tmp_path / "o.csv"),
         "is the same file as -o"),
        (("allpairs", d0, "-o", d0 / "b.png"), "is an input of this run"),
        (("pair", d0 / "a.png", d1 / "a.png", "--spatial-map", d1 / "a.png"),
         "is an input of this run"),
        (("pair", d0 / "a.png", d1 / "a.png", "--spatial-map", tmp_path / "lnk.png"),
         "is an input of this run"),
        (("dirs", d0, d1, "-o", tmp_path / "nodir" / "o.csv"), "no such directory"),
        (("dirs", d0, d1, "-o", tmp_path / "o.csv", "--summary", tmp_path / "nodir" / "s.json"),
         "no such directory"),
        (("demo", "--save", d0 / "a.png"), "is a file"),
    ]
    outs = cli_many(*[(*args, "--device", "cpu") for args, _ in cases])
    for (args, needle), out in zip(cases, outs):
        one_line_error(out, 2, needle)
    assert snapshot(tmp_path) == before  # nothing written, nothing changed


def test_an_existing_file_lpips_fast_did_not_write_is_not_overwritten(tmp_path):
    d0, d1 = folders_with_sizes(tmp_path, ["a.png", "b.png"], sizes=((64, 64),))
    notes, config = tmp_path / "notes.txt", tmp_path / "config.json"
    notes.write_text("my notes\n")
    config.write_text('{"lr": 0.1}\n')
    common = ("-q", "--workers", "0", "--device", "cpu")
    refused_csv, refused_summary, rerun = cli_many(
        ("dirs", d0, d1, "-o", notes, *common),
        ("allpairs", d0, "-o", tmp_path / "o.csv", "--summary", config, *common),
        ("allpairs", d1, "-o", tmp_path / "again.csv", *common))
    one_line_error(refused_csv, 2, "notes.txt: exists and is not an lpips-fast CSV")
    one_line_error(refused_summary, 2, "config.json: exists and is not an lpips-fast summary")
    assert notes.read_text() == "my notes\n" and config.read_text() == '{"lr": 0.1}\n'
    assert not (tmp_path / "notes.summary.json").exists() and not (tmp_path / "o.csv").exists()
    assert rerun.returncode == 0, rerun.stderr
    again = cli("dirs", d0, d1, "-o", tmp_path / "again.csv", *common)  # an earlier run's files
    assert again.returncode == 0, again.stderr                          # are replaced


def test_the_summary_s_temporary_file_is_a_new_name(tmp_path):
    """The summary is written to a temporary file and renamed: a fixed NAME.tmp replaced a
    user's file of that name, and a failed write must leave no temporary file behind."""
    d0, d1 = folders_with_sizes(tmp_path, ["a.png"], sizes=((64, 64),))
    users = tmp_path / "o.summary.json.tmp"
    users.write_text("a user's file\n")
    done = cli("dirs", d0, d1, "-o", tmp_path / "o.csv", "-q", "--workers", "0",
               "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert users.read_text() == "a user's file\n"
    assert json.loads((tmp_path / "o.summary.json").read_text())["complete"] is True
    with pytest.raises(TypeError):  # not JSON-serializable: nothing written, nothing left
        jobs.write_json(tmp_path / "o.summary.json", {"x": object()})
    assert json.loads((tmp_path / "o.summary.json").read_text())["complete"] is True
    assert not list(tmp_path.glob(".o.summary.json.*"))


def test_video_output_that_is_an_input_is_refused(tmp_path):
    pytest.importorskip("av")
    import numpy as np
    frames = [np.full((32, 32, 3), 10 * t, np.uint8) for t in range(3)]
    write_video(tmp_path / "ref.mp4", frames)
    before = snapshot(tmp_path)
    out = cli("video", tmp_path / "ref.mp4", tmp_path / "ref.mp4", "-o", tmp_path / "ref.mp4")
    one_line_error(out, 2, "is an input of this run")
    assert snapshot(tmp_path) == before


NOT_OUR_CSV = {
    "an image": None,  # filled with a PNG's bytes below
    "another header": b"a,b,lpips\nx.png,y.png,0.5\n",
    "a bad middle row": b"name,lpips\na.png,0.5\njunk\nb.png,0.25\n",
    "a value that is no number": b"name,lpips\na.png,zero\n",
    "a negative value": b"name,lpips\na.png,-1\n",
    "CRLF line ends": b"name,lpips\r\na.png,0.5\r\n",
    "a complete last line that is no row": b"name,lpips\na.png,0.5\nhello\n",
    "bytes that are not text": b"name,lpips\n\x00\xff\xfe,0.5\x00\n",
}


def test_resume_refuses_a_file_that_is_not_its_csv_and_leaves_it_untouched(tmp_path):
    d0, d1 = folders_with_sizes(tmp_path, ["a.png", "b.png"])
    NOT_OUR_CSV["an image"] = (d0 / "a.png").read_bytes()
    calls = []
    for k, (what, data) in enumerate(NOT_OUR_CSV.items()):
        path = tmp_path / f"bad{k}.csv"
        path.write_bytes(data)
        calls.append(("dirs", d0, d1, "-o", path, "--resume", "--summary", "-", "-q"))
    for (what, data), out, call in zip(NOT_OUR_CSV.items(), cli_many(*calls), calls):
        one_line_error(out, 2, "cannot resume", "the file is unchanged")
        assert call[4].read_bytes() == data, what


def test_resume_cuts_only_a_half_written_last_row(tmp_path):
    header = ["name", "lpips"]
    for tail in ["c.pn", '"new\nli']:  # cut mid-row; cut inside a quoted name with a newline
        path = tmp_path / "o.csv"
        path.write_text("name,lpips\na.png,0.5\n\"b,2.png\",0.25\n" + tail, newline="")
        out = jobs.CsvOutput(path, header, 1)
        out.read()
        assert path.read_bytes().decode().endswith(tail)  # read() changes nothing
        assert out.done == {("a.png",), ("b,2.png",)} and out.values == [0.5, 0.25]
        out.open()
        out.write([["c.png", "0.125"]])
        out.close()
        assert path.read_bytes().decode() == "name,lpips\na.png,0.5\n\"b,2.png\",0.25\nc.png,0.125\n"
    s = jobs.summary([0.5, 0.25, 0.125])
    assert s["count"] == 3 and abs(s["mean"] - 0.875 / 3) < 1e-12


def test_a_file_another_run_is_writing_is_refused_untouched(tmp_path):
    """Two runs on one -o at once appended the same rows twice (--resume) or mixed their
    bytes; the CSV is now locked (flock) while a run writes it. Here the test holds the lock."""
    fcntl = pytest.importorskip("fcntl")
    d0, d1 = folders_with_sizes(tmp_path, ["a.png", "b.png"], sizes=((64, 64),))
    common = ("dirs", d0, d1, "-q", "--workers", "0", "--device", "cpu")
    out = tmp_path / "o.csv"
    assert cli(*common, "-o", out).returncode == 0
    before = snapshot(tmp_path)
    with open(out, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        # another process (the lock is the kernel's, across processes), and this one (flock
        # locks belong to an open file, so a second open in one process is refused too)
        other = spawn(*common, "-o", out, "--resume")
        outs = [cli(*common, "-o", out), finish(other)]
    for o in outs:
        one_line_error(o, 2, "o.csv: another lpips-fast run is writing this file")
    assert snapshot(tmp_path) == before
    # in one process the lock is released after each run, also after a refused one
    out.write_bytes(b"name,lpips\njunk\n")
    settings = jobs.Settings(output=out, device="cpu", resume=True)
    with pytest.raises(UsageError, match="cannot resume"):
        jobs.run(jobs.DirsJob(d0, d1), settings)
    out.write_bytes(b"name,lpips\n")  # the same file (inode), which the refused run locked
    assert jobs.run(jobs.DirsJob(d0, d1), settings).status == "complete"
    assert jobs.run(jobs.DirsJob(d0, d1), settings).resumed == 2


# --- item 4: any file name round-trips; resumed runs give the same bytes -----------------------

ODD_NAMES = ["a,comma.png", 'q"uote.png', "new\nline.png", "car\rret.png", "sep\u2028x.png",
             "=SUM(A1).png", "  space .png", os.fsdecode(b"latin\xe9-not-utf8.png"), "plain.png"]


def csv_names(path):
    import csv
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return [r[0] for r in csv.reader(f)][1:]


def test_odd_file_names_round_trip_through_the_csv_and_resume(tmp_path):
    d0, d1 = folders_with_sizes(tmp_path, ODD_NAMES)
    full, part = tmp_path / "full.csv", tmp_path / "part.csv"
    common = ("dirs", d0, d1, "--batch-size", "2", "--workers", "0", "-q", "--device", "cpu")
    whole, stopped = cli_many((*common, "-o", full), (*common, "-o", part,
                                                      {"LPIPS_FAST_STOP_AFTER": "3"}))
    assert whole.returncode == 0 and stopped.returncode == 130, (whole.stderr, stopped.stderr)
    assert sorted(csv_names(full)) == sorted(os.listdir(d0))  # the very names, bytes and all
    resumed = cli(*common, "-o", part, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert part.read_bytes() == full.read_bytes()
    stdout = cli(*common)
    assert stdout.returncode == 0 and stdout.stdout_bytes == full.read_bytes()  # CSV on stdout too
    pairs = cli("allpairs", d0, "-o", tmp_path / "all.csv", "-q", "--device", "cpu")
    assert pairs.returncode == 1  # the pairs of images of two sizes fail; names still intact
    assert set(csv_names(tmp_path / "all.csv")) <= set(os.listdir(d0))


@pytest.mark.parametrize("command", ["dirs", "allpairs"])
def test_resumed_runs_give_the_same_bytes_with_images_of_several_sizes(tmp_path, command):
    names = [f"im{k}.png" for k in range(7)]
    d0, d1 = folders_with_sizes(tmp_path, names)
    if command == "allpairs":
        job, resize = (command, d0), ("--resize", "to-first")
    else:
        job, resize = (command, d0, d1), ()
    common = (*job, *resize, "--batch-size", "2", "--workers", "0", "-q", "--device", "cpu")
    full = tmp_path / "full.csv"
    stops = [1, 3, 5]
    outs = cli_many((*common, "-o", full),
                    *[(*common, "-o", tmp_path / f"p{n}.csv", {"LPIPS_FAST_STOP_AFTER": str(n)})
                      for n in stops])
    assert outs[0].returncode == 0, outs[0].stderr
    assert all(o.returncode == 130 for o in outs[1:]), [o.stderr for o in outs]
    resumed = cli_many(*[(*common, "-o", tmp_path / f"p{n}.csv", "--resume") for n in stops])
    for n, out in zip(stops, resumed):
        assert out.returncode == 0, out.stderr
        assert (tmp_path / f"p{n}.csv").read_bytes() == full.read_bytes(), n


def test_resume_checks_the_first_runs_options_or_refuses(tmp_path):
    d0, d1 = folders_with_sizes(tmp_path, [f"im{k}.png" for k in range(4)])
    common = ("dirs", d0, d1, "--batch-size", "1", "--workers", "0", "-q", "--device", "cpu")
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    stopped = cli_many((*common, "-o", a, "--summary", "-", {"LPIPS_FAST_STOP_AFTER": "2"}),
                       (*common, "-o", b, {"LPIPS_FAST_STOP_AFTER": "2"}))
    assert [o.returncode for o in stopped] == [130, 130]
    kept_a, kept_b = a.read_bytes(), b.read_bytes()
    (tmp_path / "b.summary.json").rename(tmp_path / "moved.json")
    no_record_a, no_record_b = cli_many((*common, "-o", a, "--resume"),
                                        (*common, "-o", b, "--resume"))
    one_line_error(no_record_a, 2, "a.summary.json is missing", "options of its first run")
    one_line_error(no_record_b, 2, "b.summary.json is missing")
    other = cli(*common, "-o", b, "--resume", "--summary", tmp_path / "moved.json",
                "--resample", "bilinear")
    same = cli(*common, "-o", b, "--resume", "--match", "stem",
               "--summary", tmp_path / "moved.json")
    one_line_error(other, 2, "started with --resample bicubic (now bilinear)")
    one_line_error(same, 2, "cannot resume")  # another header: name0,name1,lpips
    assert a.read_bytes() == kept_a and b.read_bytes() == kept_b
    ok = cli(*common, "-o", b, "--resume", "--summary", tmp_path / "moved.json")
    assert ok.returncode == 0 and "2 of 4 pairs already" in ok.stderr


def test_resume_refuses_rows_scored_against_other_inputs(tmp_path):
    """The same file names in another folder (dist_q10/ after dist_q50/) must not pass for
    this run's: the resolved inputs are checked like the options."""
    d0, d1 = folders_with_sizes(tmp_path, [f"im{k}.png" for k in range(4)], sizes=((64, 64),))
    other = tmp_path / "other"
    other.mkdir()
    for k in range(4):
        image(other / f"im{k}.png", 50 + k)
    common = ("--batch-size", "1", "--workers", "0", "-q", "--device", "cpu")
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    stop = {"LPIPS_FAST_STOP_AFTER": "2"}
    stopped = cli_many(("dirs", d0, d1, "-o", a, *common, stop),
                       ("allpairs", d1, "-o", b, *common, stop))
    assert [o.returncode for o in stopped] == [130, 130], [o.stderr for o in stopped]
    kept_a, kept_b = a.read_bytes(), b.read_bytes()
    dirs, pairs = cli_many(("dirs", d0, other, "-o", a, "--resume", *common),
                           ("allpairs", other, "-o", b, "--resume", *common))
    one_line_error(dirs, 2, f"started with dir1 {d1.resolve()} (now {other.resolve()})")
    one_line_error(pairs, 2, f"started with dir {d1.resolve()} (now {other.resolve()})")
    assert a.read_bytes() == kept_a and b.read_bytes() == kept_b


def test_resume_refuses_repeated_rows_and_rows_of_no_item(tmp_path):
    """Either would be counted in the summary (count 6 of 5 pairs, a mean with a foreign
    value) while the run reports success."""
    d0, d1 = folders_with_sizes(tmp_path, [f"im{k}.png" for k in range(3)], sizes=((64, 64),))
    common = ("dirs", d0, d1, "--workers", "0", "-q", "--device", "cpu")
    full = tmp_path / "full.csv"
    assert cli(*common, "-o", full).returncode == 0
    lines = full.read_text().splitlines(keepends=True)
    edits = {"twice": "".join(lines + lines[1:2]),
             "foreign": "".join(lines[:1] + ["zzz.png,1.5\n"] + lines[1:3])}
    calls = []
    for what, text in edits.items():
        (tmp_path / f"{what}.csv").write_text(text)
        shutil.copy(tmp_path / "full.summary.json", tmp_path / f"{what}.summary.json")
        calls.append((*common, "-o", tmp_path / f"{what}.csv", "--resume"))
    twice, foreign = cli_many(*calls)
    one_line_error(twice, 2, "cannot resume: row 5 repeats row 2 (im0.png)", "unchanged")
    one_line_error(foreign, 2, "cannot resume: row 2 is not a pair of this run", "unchanged")
    for what, text in edits.items():
        assert (tmp_path / f"{what}.csv").read_text() == text


# --- item 5: errors, not tracebacks -------------------------------------------------------------

@contextlib.contextmanager
def unwritable(folder):
    """A folder no one can write to: chmod for a user, the immutable flag for root (whom
    permissions do not stop)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    if not shutil.which("chattr") or subprocess.run(["chattr", "+i", folder]).returncode:
        pytest.fail("root needs chattr (e2fsprogs) and an ext2/3/4 file system for this test")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", folder], check=True)


def test_unwritable_outputs_bad_devices_and_missing_weights_are_one_line(tmp_path):
    d0, d1 = folders_with_sizes(tmp_path, ["a.png", "b.png"])
    locked = tmp_path / "locked"
    locked.mkdir()
    common = ("dirs", d0, d1, "-q")
    out_csv = tmp_path / "o.csv"
    with unwritable(locked):
        cases = [
            ((*common, "-o", locked / "o.csv"), "cannot write -o"),
            ((*common, "-o", out_csv, "--summary", locked / "s.json"), "cannot write --summary"),
            (("pair", d0 / "a.png", d1 / "a.png", "--spatial-map", locked / "m.png"),
             "cannot write --spatial-map"),
            ((*common, "-o", out_csv, "--device", "meta"), "meta device holds no values"),
            ((*common, "-o", out_csv, "--device", "mps"), "MPS is not available"),
            ((*common, "-o", out_csv, "--device", "cuda:7"), "--device cuda:7"),
            ((*common, "-o", out_csv, "--device", "gpu0"), "not a device"),
            ((*common, "-o", out_csv, "--net", "squeeze", "--device", "cpu",
              {"LPIPS_FAST_HOME": str(tmp_path / "empty_home")}), "squeeze"),
        ]
        outs = cli_many(*[args for args, _ in cases])
    for (args, needle), out in zip(cases, outs):
        one_line_error(out, 2, needle)
        assert "rank" not in out.stderr
    assert not out_csv.exists() and list(locked.iterdir()) == []  # no empty CSV left behind


def test_a_closed_pipe_stops_quietly_with_its_exit_code(tmp_path):
    d0, d1 = folders_with_sizes(tmp_path, [f"im{k}.png" for k in range(6)], sizes=((64, 64),))
    p = subprocess.Popen([sys.executable, "-m", "lpips_fast", "dirs", str(d0), str(d1),
                          "--batch-size", "1", "--workers", "0", "-q", "--device", "cpu"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline() == b"name,lpips\n"
    p.stdout.close()  # like `| head -n 1`
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 141, err
    assert "Traceback" not in err and "Exception ignored" not in err
    assert err.strip().splitlines()[-1] == "stopped: the output pipe was closed"


def test_a_failure_in_one_process_does_not_speak_of_ranks(tmp_path):
    d0, d1 = folders_with_sizes(tmp_path, [f"im{k}.png" for k in range(4)], sizes=((64, 64),))
    out = cli("dirs", d0, d1, "-o", tmp_path / "o.csv", "--batch-size", "1", "--workers", "0",
              "-q", "--device", "cpu", env={"LPIPS_FAST_FAIL_RANK": "0"})
    one_line_error(out, 1, "scoring pair im1.png failed: RuntimeError: injected failure",
                   "the 1 new rows written to")
    assert "rank" not in out.stderr
    assert len((tmp_path / "o.csv").read_text().splitlines()) == 2  # the header and im0.png


# --- item 7: linked folders under --recursive ---------------------------------------------------

def test_linked_folders_are_listed_as_skipped(tmp_path):
    root = tmp_path / "pool"
    (root / "sub").mkdir(parents=True)
    for rel, seed in (("a.png", 0), ("sub/b.png", 1), ("sub/c.png", 2)):
        image(root / rel, seed)
    (root / "loop").symlink_to(root, target_is_directory=True)
    (root / "again").symlink_to(root / "sub", target_is_directory=True)
    names, ignored, skipped = list_images(root, recursive=True)
    assert names == ["a.png", "sub/b.png", "sub/c.png"] and skipped == ["again/", "loop/"]
    out = cli("allpairs", root, "-r", "-o", tmp_path / "o.csv", "-q", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert "skipped 2 linked folders" in out.stderr and "again/, loop/" in out.stderr
    record = json.loads((tmp_path / "o.summary.json").read_text())
    assert record["ignored"] == ["again/", "loop/"] and record["count"] == 3


# --- item 8: the pipeline from Python -----------------------------------------------------------

def test_the_pipeline_from_python_writes_what_the_cli_writes(tmp_path):
    d0, d1 = folders_with_sizes(tmp_path, [f"im{k}.png" for k in range(5)])
    by_cli = cli("dirs", d0, d1, "-o", tmp_path / "cli.csv", "--batch-size", "2",
                 "--workers", "0", "-q", "--device", "cpu")
    assert by_cli.returncode == 0, by_cli.stderr
    notes = []
    outcome = jobs.run(jobs.DirsJob(d0, d1), jobs.Settings(
        output=tmp_path / "py.csv", batch_size=2, device="cpu"), note=notes.append)
    assert outcome.status == "complete" and outcome.written == 5 and not outcome.failures
    assert (tmp_path / "py.csv").read_bytes() == (tmp_path / "cli.csv").read_bytes()
    assert outcome.info["count"] == 5 and outcome.summary_path == tmp_path / "py.summary.json"
    with pytest.raises(UsageError, match="is an input of this run"):
        jobs.run(jobs.AllPairsJob(d0), jobs.Settings(output=d0 / "im0.png", device="cpu"))


def test_check_outputs_and_devices_directly(tmp_path):
    a = tmp_path / "a.png"
    a.write_bytes(b"x")
    jobs.check_outputs({"-o": tmp_path / "new.csv", "--summary": None}, [a])  # fine
    assert not (tmp_path / "new.csv").exists()  # the probe leaves nothing behind
    with pytest.raises(UsageError, match="is the same file as -o"):
        jobs.check_outputs({"-o": tmp_path / "x.csv", "--summary": tmp_path / "." / "x.csv"})
    with pytest.raises(UsageError, match="is a directory"):
        jobs.check_outputs({"-o": tmp_path})
    assert jobs.resolve_device("cpu").type == "cpu"
    for bad in ("meta", "nonsense:3"):
        with pytest.raises(UsageError, match=f"--device {bad}"):
            jobs.resolve_device(bad)


def test_unreadable_inputs_are_one_line_errors(tmp_path, monkeypatch, capsys):
    """Root reads every file, so the refusal is simulated where the operating system would
    raise it: listing a folder and opening an image."""
    import PIL.Image
    from lpips_fast import cli, io
    d0, d1 = folders_with_sizes(tmp_path, ["a.png"])

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(args[0]))
    with monkeypatch.context() as m:
        m.setattr(os, "listdir", denied)
        with pytest.raises(UsageError, match="cannot list the folder .Permission denied"):
            list_images(d0)
        assert cli.main(["dirs", str(d0), str(d1), "--device", "cpu"]) == 2
    with monkeypatch.context() as m:
        m.setattr(PIL.Image, "open", denied)
        with pytest.raises(io.ImageError, match="a.png: permission denied"):
            io.load_image(d0 / "a.png")
        assert cli.main(["pair", str(d0 / "a.png"), str(d1 / "a.png"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if line.startswith("error: ")] == [
        f"error: {d0}: cannot list the folder (Permission denied)",
        f"error: {d0 / 'a.png'}: permission denied"]
