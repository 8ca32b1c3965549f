"""A real multi-node Ray cluster on this machine, for tests and benchmarks of ``cinemae.scale``.

Each node is a ``ray start`` process tree with its own temp dir, CPU count and a small object
store; every port is chosen free. :meth:`RayCluster.kill_node` SIGKILLs one node's processes
(a lost machine); :meth:`RayCluster.stop` kills every process the cluster started, found by its
temp dir in their command lines and by parentage, so other Ray users on the machine are left
alone (``ray stop`` would stop all of them).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray.scripts.scripts as ray_scripts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) for every process we can read."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        table[int(name)] = (ppid, cmd)
    return table


def processes_of(marker: str) -> set[int]:
    """Processes whose command line contains ``marker``, and all their descendants."""
    table = _proc_table()
    found = {p for p, (_, cmd) in table.items() if marker in cmd and p != os.getpid()}
    grew = True
    while grew:
        grew = False
        for p, (ppid, _) in table.items():
            if ppid in found and p not in found:
                found.add(p)
                grew = True
    return found


class RayCluster:
    """``with RayCluster(root) as c: c.start_head(1); c.add_node(1); ...`` (torn down on exit).

    root: a folder for the nodes' temp dirs (a short symlink to it is made under /tmp, since
          Ray's Unix socket paths must stay under 107 characters)
    """

    def __init__(self, root: Path, object_store_mb: int = 200) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.link = tempfile.mktemp(prefix="cr-", dir="/tmp")
        os.symlink(self.root, self.link)
        self.object_store = object_store_mb * 1024 * 1024
        self.port: int | None = None
        self.nodes: list[str] = []  # temp dir of each node, the head first
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _start(self, args: list[str], name: str) -> str:
        tmp = f"{self.link}/{name}"
        cmd = [sys.executable, ray_scripts.__file__, "start", *args, "--temp-dir", tmp,
               "--object-store-memory", str(self.object_store), "--disable-usage-stats",
               "--dashboard-agent-listen-port", str(free_port()),
               "--dashboard-agent-grpc-port", str(free_port()),
               "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port())]
        self.nodes.append(tmp)  # before starting: a half-started node is still torn down
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=180)
        if r.returncode != 0:
            raise RuntimeError(f"ray start failed ({r.returncode}): {r.stderr[-2000:]}")
        return tmp

    def start_head(self, num_cpus: int) -> None:
        self.port = free_port()
        self._start(["--head", "--port", str(self.port), "--num-cpus", str(num_cpus),
                     "--include-dashboard", "false", "--node-ip-address", "127.0.0.1"], "h")

    def add_node(self, num_cpus: int) -> str:
        return self._start(["--address", self.address, "--num-cpus", str(num_cpus),
                            "--node-ip-address", "127.0.0.1"], f"w{len(self.nodes)}")

    def alive_nodes(self) -> int:
        code = (f"import ray, logging; ray.init(address={self.address!r}, logging_level=logging.ERROR); "
                "print(sum(n['Alive'] for n in ray.nodes()))")
        r = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True,
                           timeout=120)
        return int(r.stdout.strip().splitlines()[-1])

    def kill_node(self, tmp: str) -> int:
        """SIGKILL every process of the node with temp dir ``tmp`` (a lost machine); returns how many."""
        pids = processes_of(tmp)
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(pids)

    def stop(self) -> None:
        """Kill every process of every node (workers first would race their restarts, so all at once)."""
        for _ in range(3):
            pids = set().union(*(processes_of(t) for t in self.nodes)) if self.nodes else set()
            if not pids:
                break
            for p in pids:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        if os.path.islink(self.link):
            os.unlink(self.link)

    def __enter__(self) -> RayCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
