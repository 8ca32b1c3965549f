"""The scan command: ``cinemae-detect BUNDLE DIR --out results.jsonl [--resume]``.

For back-filling a content-management system: millions of files, runs that get killed. This
module only drives and reports; the results file is :mod:`.results` and the scoring
:mod:`.worker`.

Exit codes: 0 every input of this run was scored; 1 some input failed (each has an error
record); 2 the results file cannot be used (locked, not ours, another model's, already holding
results without ``--resume``); 74 writing the results failed (disk full, quota, I/O error):
everything reported before is on disk, rerun with ``--resume`` once there is room; 130
interrupted (rerun with ``--resume``).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from ..commands import format_row
from .results import ResultsExist, ResultsFile, ResultsWriteError, ScanError
from .worker import iter_batches

EXIT_WRITE_FAILED = 74  # sysexits.h EX_IOERR


def scan(det: Any, inputs: Sequence[str], out: str | os.PathLike[str], *, resume: bool = False,
         as_json: bool = False, progress: bool = True, batch_size: int | None = None,
         workers: int = 2, want_lcas: bool = False, prog: str = "cinemae-detect") -> int:
    """Score ``inputs`` (file paths) with ``det`` and append one record per input to ``out``.

    Prints each new result (a table row, or the JSON record with ``as_json``) to stdout and a
    progress bar to stderr. Returns the exit code (module docstring).
    """
    from tqdm import tqdm

    rf = ResultsFile(out, model=det.model)
    try:
        rf.open(resume=resume)
    except ResultsExist as e:
        print(f"{prog}: {e}; pass --resume to continue that scan, or choose another --out file", file=sys.stderr)
        return 2
    except ScanError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    with rf:
        if rf.repaired_bytes:
            print(f"# {rf.name}: cut off an incomplete last line ({rf.repaired_bytes} bytes, from an "
                  "interrupted write)", file=sys.stderr)
        n_before = rf.records
        if n_before:
            print(f"# resuming: {n_before} records already in {rf.name}", file=sys.stderr)
        counts = {"scored": 0, "failed": 0, "skipped": 0}
        bar = tqdm(total=len(inputs), unit="img", file=sys.stderr, disable=True if not progress else None,
                   dynamic_ncols=True)
        try:
            for recs, skipped in iter_batches(det, inputs, rf.done, batch_size=batch_size,
                                              want_lcas=want_lcas, workers=workers):
                counts["skipped"] += skipped
                if recs:
                    rf.append(recs)  # durable before it is reported
                for d in recs:
                    counts["failed" if d["error"] else "scored"] += 1
                    line = json.dumps(d) if as_json else format_row(d)
                    if bar.disable:
                        print(line, flush=True)
                    else:
                        bar.write(line, file=sys.stdout)
                bar.update(len(recs) + skipped)
                bar.set_postfix(counts, refresh=False)
        except ResultsWriteError as e:
            bar.close()
            import errno

            why = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                   errno.EFBIG: "the file-size limit is reached"}.get(e.errno or 0, "the write failed")
            print(f"{prog}: {e}: {why}; the {rf.records} records before it are safe in {rf.name}. Make room, "
                  "then rerun with --resume to continue", file=sys.stderr)
            return EXIT_WRITE_FAILED
        except KeyboardInterrupt:
            bar.close()
            print(f"# interrupted: {counts['scored'] + counts['failed']} records written this run "
                  f"are in {rf.name}; rerun with --resume to continue", file=sys.stderr)
            return 130
        except BrokenPipeError:  # `... | head`: the records are still written
            sys.stderr.close()
            return 0
        finally:
            bar.close()
        print(f"# {counts['scored']} scored, {counts['failed']} failed, {counts['skipped']} already "
              f"done; {rf.records} records in {rf.name}", file=sys.stderr)
        return 1 if counts["failed"] else 0
