"""Scoring beyond one machine: the Ray Data cluster scan (``cinemae-scan``).

* :mod:`.inputs`  list folders / URIs (pyarrow filesystems: local, ``s3://``, ``gs://``, ...)
  or a manifest of URIs, and read one input's bytes
* :mod:`.shards`  the output folder: a lock, the committed shards (what resume skips), atomic
  shard commits, the deterministic plan of chunks
* :mod:`.worker`  the Ray Data stages: a byte-reading task and the scoring actor (one
  ``Detector`` each)
* :mod:`.cli`     the driver: plan, run the pipeline, commit one shard per finished chunk

Ray and pyarrow are optional (``pip install 'cinemae[scale]'``); nothing here is imported by
the runtime.
"""
