"""Batch jobs (`dirs`, `allpairs`, `video`): one pipeline from the listing to the summary.

`run(job, settings)` takes the same steps for every kind of job, in one process or on every rank
of a torch.distributed launch:

1. plan, on rank 0, before a byte is written: the job lists what it reads and the rows it will
   write; the output paths are checked (none is an input or another output, each has a folder);
   a resumed CSV is read and validated, and the options of its first run are compared;
2. every rank gets the plan and builds the model (a failure on any rank stops all);
3. rank 0 creates the CSV with its header (or, resuming, cuts a half-written last row) and
   marks the summary incomplete;
4. the chunks are scored across the ranks (`distributed.run_sharded`); rank 0 writes their rows
   in order, flushed chunk by chunk, skipping rows the resumed file already has;
5. rank 0 writes the summary and returns an `Outcome`, which the caller reports.

A job kind (`DirsJob`, `AllPairsJob`, `VideoJob`) says only what is its own: what it reads, its
CSV columns, how its work is cut into chunks and how a chunk is scored. Chunks are cut from the
whole listing, never from what remains, so a resumed run computes every value exactly as an
uninterrupted one and writes the same bytes.

The package, one file per concern: `protocol` (Settings, Listing, Outcome, the Job and Scorer
protocols), `kinds` (the three job kinds), `pipeline` (`run`), `outputs` (output checks, the
CSV and its lock), `records` (the summary, the resume check), `ranks` (agreement across ranks).
"""
from ..devices import resolve_device
from ..errors import NotJoined, Quiet, UsageError
from .kinds import MAX_LISTED, AllPairsJob, DirsJob, VideoJob, listing_text
from .outputs import (HEADERS, NAME_ERRORS, CsvOutput, check_outputs, format_value,
                      refuse_foreign_files)
from .pipeline import STOP_AFTER_ENV, make_model, run, stderr_note
from .protocol import Job, Listing, Outcome, Scorer, Settings
from .ranks import FAIL_RANK_ENV, agree, context, share
from .records import INPUT_KEYS, summary, write_json

__all__ = ["run", "Settings", "Outcome", "Listing", "Job", "Scorer", "DirsJob", "AllPairsJob",
           "VideoJob", "CsvOutput", "check_outputs", "refuse_foreign_files", "format_value",
           "summary", "write_json",
           "make_model", "resolve_device", "context", "share", "agree", "listing_text",
           "stderr_note", "UsageError", "NotJoined", "Quiet", "MAX_LISTED", "HEADERS",
           "NAME_ERRORS", "INPUT_KEYS", "FAIL_RANK_ENV", "STOP_AFTER_ENV"]
