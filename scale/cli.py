"""``cinemae-scan [BUNDLE] SOURCE... --out DIR``: score an archive on a Ray cluster, exactly once.

The driver lists the inputs, subtracts those already in committed shards of ``DIR``, cuts the
rest into chunks (:mod:`.shards`), and runs a Ray Data pipeline: a zero-CPU task stage reads
each input's bytes (:func:`.worker.read_batch`), a fixed pool of actors, each holding one
``Detector``, scores them (:class:`.worker.ScoreActor`). The records stream back to the driver
in input order; as soon as a chunk is complete the driver commits it as one shard (atomic
rename). Killing the driver, a worker or a node loses only uncommitted chunks: rerun the same
command and it scores what is missing.

``--address`` joins a running cluster (``ray start --head`` ...); without it a local Ray is
started for this run (``--num-cpus``, ``--object-store-memory``) and stopped at the end.

Exit codes: 0 every input of this run scored, 1 some inputs failed (each has an error record),
2 usage or output-folder error, 3 the cluster failed mid-run (rerun to continue), 74 a shard
could not be written (disk full; rerun once there is room), 130 interrupted (rerun to continue).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from typing import Any

from cinemae.runtime.inputs import split_bundle

from .inputs import list_inputs
from .shards import ShardError, ShardStore, plan_chunks

PROG = "cinemae-scan"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description="Score an image archive on a Ray cluster, "
                                 "exactly once and resumable, into sharded JSON-lines output.")
    ap.add_argument("paths", nargs="*", metavar="[BUNDLE] SOURCE",
                    help="a bundle directory (optional; default: the embedded bundle), then folders, "
                         "files or URIs (s3://, gs://, file://) to score")
    ap.add_argument("--bundle", help="bundle directory (instead of the first positional); it must "
                                     "exist at the same path on every node")
    ap.add_argument("--manifest", action="append", default=[],
                    help="a file listing one input path or URI per line (repeatable)")
    ap.add_argument("--out", required=True, help="output folder of shards (a local or shared "
                                                 "POSIX folder the driver writes)")
    ap.add_argument("--address", help="Ray cluster to join (e.g. 10.0.0.1:6379 or 'auto'); "
                                      "default: start a local Ray for this run")
    ap.add_argument("--actors", type=int, default=1, help="scoring actors, each one Detector (default 1)")
    ap.add_argument("--cpus-per-actor", type=float, default=1.0,
                    help="CPUs reserved per actor; also its ONNX Runtime thread count (default 1)")
    ap.add_argument("--gpus-per-actor", type=float, default=0.0,
                    help="GPUs reserved per actor (e.g. 1, or 0.5 to pack two); use with --device cuda")
    ap.add_argument("--batch-size", type=int, default=16, help="images per backend call (default 16)")
    ap.add_argument("--chunk-size", type=int, default=1000,
                    help="inputs per shard, the unit of commit and of loss on a crash (default 1000)")
    ap.add_argument("--backend", default="auto", choices=["auto", "tensorrt", "onnxruntime"])
    ap.add_argument("--device", default="cpu", help="device of each actor: cpu (default), cuda, cuda:N")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    ap.add_argument("--k", type=int, default=None, help="masking runs (default: the bundle's)")
    ap.add_argument("--max-pixels", type=int, default=None, help="per-image decoded pixel limit")
    from cinemae.runtime.commands import add_reship_arguments

    add_reship_arguments(ap, "each input")  # recorded in OUT/scan.json: a rerun with another is refused
    ap.add_argument("--num-cpus", type=int, default=None,
                    help="local Ray only: CPUs it may use (default: all)")
    ap.add_argument("--object-store-mb", type=int, default=512,
                    help="local Ray only: object-store memory in MB (default 512)")
    ap.add_argument("--no-progress", action="store_true")
    return ap


class Progress:
    """A tqdm bar on a terminal, else a plain line every ``every`` seconds; counts for the summary."""

    def __init__(self, total: int, enabled: bool, every: float = 10.0) -> None:
        from tqdm import tqdm

        self.total, self.every, self.enabled = total, every, enabled
        self.counts = {"scored": 0, "failed": 0}
        self.shards = 0
        self.t0 = self.last = time.perf_counter()
        tty = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, unit="img", file=sys.stderr, disable=not tty, dynamic_ncols=True)

    def rate(self) -> float:
        n = self.counts["scored"] + self.counts["failed"]
        return n / max(time.perf_counter() - self.t0, 1e-9)

    def update(self, scored: int, failed: int, shards: int = 0) -> None:
        self.counts["scored"] += scored
        self.counts["failed"] += failed
        self.shards += shards
        self.bar.update(scored + failed)
        if not self.bar.disable:
            self.bar.set_postfix(self.counts, refresh=False)
        elif self.enabled and time.perf_counter() - self.last >= self.every:
            self.last = time.perf_counter()
            n = self.counts["scored"] + self.counts["failed"]
            print(f"# progress: {n}/{self.total} ({self.counts['scored']} scored, {self.counts['failed']} "
                  f"failed), {self.shards} shards committed, {self.rate():.1f} images/s", file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        self.bar.close()


def _cause(e: BaseException) -> str:
    """The last line of a Ray error (the exception raised in the worker), prefixed by its type."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"


def _init_ray(args: argparse.Namespace) -> Any:
    import ray

    logging.getLogger("ray").setLevel(logging.WARNING)
    if args.address:
        ray.init(address=args.address, logging_level=logging.WARNING, log_to_driver=True)
    else:
        ray.init(num_cpus=args.num_cpus, object_store_memory=args.object_store_mb * 1024 * 1024,
                 include_dashboard=False, logging_level=logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.verbose_stats_logs = False
    ctx.execution_options.preserve_order = True  # chunks finish in order: one open chunk at a time
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return ray


def build_dataset(ray: Any, chunks: list[tuple[str, list[str]]], names: dict[str, str], args: argparse.Namespace,
                  detector_kwargs: dict[str, Any]) -> Any:
    """The pipeline: rows {source, path, chunk} -> read (tasks) -> score (actor pool) ->
    {path, chunk, record}; ``chunks`` hold input identities, ``names`` maps them to the names
    records show."""
    from .worker import ScoreActor, read_batch

    rows = [{"source": os.fsencode(names[p]), "path": os.fsencode(p), "chunk": cid} for cid, ids in chunks for p in ids]
    bs = max(1, args.batch_size)
    # blocks of a few batches: reading overlaps scoring, and a block of photos stays far below
    # the object store's size (at most 20,000 blocks: a million inputs make blocks of 50)
    per_block = max(4 * bs, math.ceil(len(rows) / 20_000))
    ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / per_block)))
    ds = ds.map_batches(read_batch, fn_kwargs={"max_bytes": detector_kwargs["max_bytes"]},
                        batch_size=bs, num_cpus=0,
                        compute=ray.data.TaskPoolStrategy(size=max(2, 2 * args.actors)))
    return ds.map_batches(ScoreActor, fn_constructor_kwargs=detector_kwargs, batch_size=bs,
                          compute=ray.data.ActorPoolStrategy(size=max(1, args.actors)),
                          num_cpus=args.cpus_per_actor, num_gpus=args.gpus_per_actor or None)


def run(args: argparse.Namespace) -> int:
    import json

    from cinemae.runtime.bundle import BundleError, resolve_bundle
    from cinemae.runtime.preprocess import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
    from cinemae.runtime.reship import ReshipEnsemble

    try:
        bundle_arg, sources = split_bundle(args.paths, args.bundle)
        if not sources and not args.manifest:
            print(f"{PROG}: give at least one folder, file, URI or --manifest", file=sys.stderr)
            return 2
        bundle = resolve_bundle(bundle_arg)
        ens = ReshipEnsemble.parse(args.reship, args.reship_on)  # a bad ensemble stops here, before Ray
    except (BundleError, OSError, ValueError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    k = bundle.k if args.k is None else args.k
    meta = {"model": bundle.fingerprint(), "k": k, "precision": args.precision,
            **({"reship": ens.fingerprint()} if ens is not None else {})}
    store = ShardStore(args.out)
    try:
        store.lock()
        stale = store.remove_temporaries()
        store.check_meta(meta)
        done, n_shards = store.done()
    except (ShardError, OSError, ValueError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    try:
        t_list = time.perf_counter()
        try:
            inputs = list_inputs(sources, args.manifest)
        except (OSError, ValueError) as e:
            print(f"{PROG}: cannot list the inputs ({e})", file=sys.stderr)
            return 2
        remaining = [p for p in inputs if p not in done]
        skipped = len(inputs) - len(remaining)
        chunks = plan_chunks(remaining, args.chunk_size)
        print(f"# {len(inputs)} inputs listed in {time.perf_counter() - t_list:.1f} s: {skipped} already in "
              f"{n_shards} committed shards of {args.out}, {len(remaining)} to score in {len(chunks)} chunks"
              + (f" ({stale} half-written shards of a killed run removed)" if stale else ""), file=sys.stderr)
        if not chunks:
            print(f"# 0 scored, 0 failed, {skipped} skipped (already done); nothing to do", file=sys.stderr)
            return 0
        detector_kwargs = {"bundle": None if bundle_arg is None else os.path.abspath(bundle_arg),
                           "backend": args.backend, "device": args.device, "precision": args.precision,
                           "k": args.k, "batch_size": args.batch_size,
                           "threads": max(1, int(math.ceil(args.cpus_per_actor))),
                           "max_pixels": args.max_pixels or DEFAULT_MAX_PIXELS, "max_bytes": DEFAULT_MAX_BYTES,
                           "reship": args.reship, "reship_on": args.reship_on}
        try:
            ray = _init_ray(args)
        except Exception as e:  # noqa: BLE001 - no cluster at --address, Ray cannot start here, ...
            print(f"{PROG}: cannot {'join Ray at ' + args.address if args.address else 'start a local Ray'} "
                  f"({_cause(e)})", file=sys.stderr)
            return 3
        have = ray.cluster_resources()
        for res, per in (("CPU", args.cpus_per_actor), ("GPU", args.gpus_per_actor)):
            if per and args.actors * per > have.get(res, 0):
                print(f"# warning: {args.actors} actors x {per:g} {res} need {args.actors * per:g} {res}s and the "
                      f"cluster has {have.get(res, 0):g} now; the scan waits until there are enough (an autoscaler "
                      "adds nodes; otherwise lower --actors)", file=sys.stderr)
        sizes = {cid: len(ids) for cid, ids in chunks}
        order = dict(chunks)
        progress = Progress(len(remaining), enabled=not args.no_progress)
        pending: dict[str, dict[str, str]] = {}
        written = dup = 0
        try:
            ds = build_dataset(ray, chunks, inputs, args, detector_kwargs)
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for cid, path, rec in zip(batch["chunk"], batch["path"], batch["record"], strict=True):
                    got = pending.setdefault(str(cid), {})
                    ident = os.fsdecode(bytes(path))
                    if ident in got:
                        dup += 1  # a retried task's second answer: keep the first
                        continue
                    got[ident] = str(rec)
                    if len(got) == sizes[str(cid)]:
                        recs = [got[p] for p in order[str(cid)]]
                        store.commit(str(cid), recs)
                        failed = sum(json.loads(r)["error"] is not None for r in recs)
                        written += 1
                        del pending[str(cid)]
                        progress.update(len(recs) - failed, failed, 1)
        except (ShardError, OSError) as e:  # the driver's own disk: say so, not "the cluster"
            progress.close()
            print(f"{PROG}: cannot commit a shard in {args.out} ({e}); {written} shards committed this run "
                  "are kept; rerun the same command once it is writable", file=sys.stderr)
            return 74
        except KeyboardInterrupt:
            progress.close()
            print(f"# interrupted: {written} shards committed this run; rerun the same command to "
                  "continue", file=sys.stderr)
            return 130
        except Exception as e:  # noqa: BLE001 - a cluster failure: what is committed stays committed
            progress.close()
            print(f"{PROG}: the cluster run failed ({_cause(e)}); "
                  f"{written} shards committed this run are kept; rerun the same command to continue",
                  file=sys.stderr)
            return 3
        finally:
            progress.close()
            ray.shutdown()
        c = progress.counts
        secs = time.perf_counter() - progress.t0
        print(f"# {c['scored']} scored, {c['failed']} failed, {skipped} skipped (already done); {written} "
              f"shards written to {args.out} in {secs:.1f} s, {progress.rate():.1f} images/s"
              + (f"; {dup} duplicate answers of retried tasks dropped" if dup else ""), file=sys.stderr)
        return 1 if c["failed"] else 0
    finally:
        store.unlock()


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
