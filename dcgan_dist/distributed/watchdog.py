"""A hung rank found within trainer.hang_timeout_s, named, shown where it hangs, and its process ended.

Nothing else times the step out: a rank stuck in a read, a loader worker that stopped, a wedged GPU or a process
frozen by SIGSTOP leaves every other rank waiting inside a collective, which gloo and NCCL give up on only after
trainer.collective_timeout_s (30 minutes), and Ray Train's collectives never. So a thread on every rank watches the
loop's marks (waiting for data, stepping, a step done, an evaluation, a checkpoint). When the current phase has
gone on longer than its allowance (allowance()), the run is hung, and the thread:
1. reads the board, where every rank's thread posts a heartbeat (Ray: an actor on the driver's node; torchrun: the
   agent's store; both outlive any rank), twice, to tell the ranks that did not arrive (no sign of life, still
   waiting for data, behind) from those waiting for them in a collective;
2. writes its report (those ranks with their node, address, process and last step; the stacks of every thread of
   this process and of its loader workers, which dump theirs on SIGUSR1) to its log and run_dir/hangs/;
3. on CUDA, asks NCCL's flight recorder for its record of the collectives in flight (switched on by nccl_tracing);
4. ends this process with interruptions.EXIT_HUNG, its loader workers first: no checkpoint, since the collectives
   are stuck, so the launcher restarts from the newest one (interruptions.py says what follows).
"""

from __future__ import annotations

import faulthandler
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Protocol

from . import processes, rendezvous
from .interruptions import EXIT_HUNG, ignore_in_loader_workers

# Phases the loop marks. A step is "data" (waiting for the next batch) then "step"; "interval" is the log interval's
# reduction and the sample grids. The first "eval" and "checkpoint" are allowed as long as a collective (they end
# in one); later ones LONG_PHASE_TIMES x the longest before them (a rank waits there for rank 0's write or upload).
DATA, STEP, INTERVAL, EVAL, CHECKPOINT = "data", "step", "interval", "eval", "checkpoint"
LONG_PHASES = (EVAL, CHECKPOINT)
AUTO_FLOOR_S, AUTO_STEPS = 120.0, 20.0  # auto hang_timeout_s: the larger of 120 s and 20 x the median step
LONG_PHASE_TIMES = 5.0
WARMUP_STEPS = 3  # steps of each attempt under first_step_timeout_s: compilation, CUDA-graph capture, first reads
LOADER_DUMP_SIGNAL = signal.SIGUSR1
NCCL_TRACE_ENTRIES = "2000"  # TORCH_NCCL_TRACE_BUFFER_SIZE when the user set none: collectives kept for a dump


class Board(Protocol):
    """Where the ranks' heartbeats meet, hosted where a frozen rank cannot take it down."""

    def post(self, rank: int, beat: dict) -> None: ...

    def read(self) -> dict[int, dict]: ...

    def hung(self, report: dict) -> None: ...


@dataclass(frozen=True)
class Limits:
    hang_timeout_s: float | None  # None: auto; 0: no watchdog
    first_step_timeout_s: float
    long_phase_s: float           # evaluation and checkpoint: trainer.collective_timeout_s
    reads_s: float = 0.0          # how long a stalled read takes to give up (data.io_timeout and retries)


def nccl_tracing() -> None:
    """Before the NCCL process group forms: keep a record of the recent collectives (torch's flight recorder), so
    that a hang report can say which collective each rank is in. A setting the user made is kept. torch 2.8 renamed
    the variable (the old name still works there, with a deprecation warning)."""
    if "TORCH_FR_BUFFER_SIZE" in os.environ or "TORCH_NCCL_TRACE_BUFFER_SIZE" in os.environ:
        return
    import torch

    renamed = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 8)
    os.environ["TORCH_FR_BUFFER_SIZE" if renamed else "TORCH_NCCL_TRACE_BUFFER_SIZE"] = NCCL_TRACE_ENTRIES


class Watchdog:
    """The loop's marks and the watching thread (start/stop). `where` is this rank's node and address."""

    def __init__(self, limits: Limits, rank: int, world_size: int, where: dict, run_dir: str | Path,
                 board: Board | None = None, on_hang: Callable[[str, float], None] | None = None,
                 exit_process: Callable[[int], None] | None = None):
        self.limits, self.rank, self.world_size, self.where = limits, rank, world_size, where
        self.hangs_dir, self.board, self.on_hang = Path(run_dir) / "hangs", board, on_hang
        self._exit = exit_process or _end_process
        self.phase, self.since, self.images, self.steps = DATA, time.monotonic(), 0, 0
        self.last_step_at: float | None = None
        self.durations: deque[float] = deque(maxlen=101)
        self._step_began = self.since
        self.longest: dict[str, float] = {}  # phase -> its longest time so far, for EVAL and CHECKPOINT
        self._seq = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        # Loader workers dump their stacks here on LOADER_DUMP_SIGNAL (loader_worker_init).
        self.loader_dumps = tempfile.mkdtemp(prefix="dcgan-stacks-")

    # --- the loop's marks: a few attribute writes, no lock (one writer; the thread reads a consistent enough view)
    def mark(self, phase: str) -> None:
        now = time.monotonic()
        if phase == DATA:
            self._step_began = now
        if self.phase in LONG_PHASES:
            self.longest[self.phase] = max(self.longest.get(self.phase, 0.0), now - self.since)
        if phase in LONG_PHASES or self.phase in LONG_PHASES:
            self.since = now  # a long phase has its own clock, and the step after it a full allowance
        self.phase = phase

    def stepped(self, images: int) -> None:
        now = time.monotonic()
        self.durations.append(now - self._step_began)
        self.images, self.steps, self.since, self.last_step_at, self.phase = images, self.steps + 1, now, now, INTERVAL

    def new_attempt(self) -> None:
        """A new attempt (a rollback's, in this process) starts with the first steps' allowance again."""
        self.phase, self.since, self.steps = DATA, time.monotonic(), 0

    # --- the rule
    def allowance(self) -> float:
        """How long the current phase may last before the run is declared hung (inf: no watchdog)."""
        lim = self.limits
        if lim.hang_timeout_s == 0:
            return float("inf")
        if self.phase in LONG_PHASES:
            if self.phase not in self.longest:
                return lim.long_phase_s
            return max(self._step_allowance(), LONG_PHASE_TIMES * self.longest[self.phase])
        return self._step_allowance()

    def _step_allowance(self) -> float:
        lim = self.limits
        if self.steps < WARMUP_STEPS:
            return max(lim.first_step_timeout_s, lim.hang_timeout_s or 0.0)
        step = lim.hang_timeout_s if lim.hang_timeout_s is not None else \
            max(AUTO_FLOOR_S, AUTO_STEPS * statistics.median(self.durations))
        # A rank that waits for a stalled read, and the ranks that wait for it in a collective, are all allowed
        # the read's own bound: the shard is skipped then, not taken for a hang.
        return max(step, lim.reads_s)

    # --- the thread
    def start(self) -> "Watchdog":
        if self.limits.hang_timeout_s == 0:
            return self
        # The heartbeat has a thread of its own, so that it goes on while a rank writes its report: only a
        # frozen process falls silent.
        self._threads = [threading.Thread(target=self._watch, name="dcgan-hang-watchdog", daemon=True)]
        if self.board is not None:
            self._threads.append(threading.Thread(target=self._beats, name="dcgan-heartbeat", daemon=True))
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        shutil.rmtree(self.loader_dumps, ignore_errors=True)

    def beat_s(self) -> float:
        """How often the heartbeat is posted: often enough for a report within the step's own allowance."""
        return max(0.5, min(5.0, (self.limits.hang_timeout_s or AUTO_FLOOR_S) / 8))

    def _watch(self) -> None:
        while not self._stop.wait(0.25):
            stalled = time.monotonic() - self.since
            if stalled > self.allowance():
                self._hung(stalled)
                return

    def _beats(self) -> None:
        while True:
            self._post()
            if self._stop.wait(self.beat_s()):
                return

    def _beat(self) -> dict:
        self._seq += 1
        return {**self.where, "rank": self.rank, "pid": os.getpid(), "images": self.images, "steps": self.steps,
                "phase": self.phase, "phase_s": round(time.monotonic() - self.since, 1), "seq": self._seq}

    def _post(self) -> None:
        try:
            self.board.post(self.rank, self._beat())
        except Exception as err:  # a board that went away must not end the run: the report says it
            print(f"dcgan_dist.watchdog: rank {self.rank}: heartbeat not posted: {type(err).__name__}: {err}",
                  file=sys.stderr, flush=True)

    # --- the hang
    def _hung(self, stalled: float) -> None:
        phase, allowance = self.phase, self.allowance()
        head = (f"dcgan_dist: hang: rank {self.rank} of {self.world_size} has been in phase {phase!r} for "
                f"{stalled:.0f} s (allowed {allowance:.0f} s: {self._allowance_source()}); last step done at "
                f"{self.images} images")
        ranks = self._who_did_not_arrive()
        lines = [head, *ranks["lines"]]
        stacks = self._stacks()
        report = "\n".join([*lines, "", stacks])
        path = self._write(report)
        print("\n".join(lines) + (f"\ndcgan_dist: hang report with the stacks: {path}" if path else "")
              + "\n" + stacks, file=sys.stderr, flush=True)
        nccl = nccl_dump(self.hangs_dir, self.rank)
        if nccl:
            print(f"dcgan_dist: NCCL flight recorder: {nccl}", file=sys.stderr, flush=True)
        summary = "; ".join(ranks["lines"][:1]) or f"rank {self.rank} stalled"
        if self.board is not None:
            try:
                self.board.hung({"rank": self.rank, "culprits": ranks["culprits"], "nodes": ranks["nodes"],
                                 "images": self.images, "stalled_s": stalled, "group": rendezvous.group()})
            except Exception:
                pass
        if self.on_hang is not None:
            try:
                self.on_hang(f"hang: {summary}; {stalled:.0f} s lost waiting; report {path}", stalled)
            except Exception:
                pass
        shutil.rmtree(self.loader_dumps, ignore_errors=True)  # stop() never runs after this
        self._exit(EXIT_HUNG)

    def _allowance_source(self) -> str:
        lim = self.limits
        if self.phase in LONG_PHASES:
            return f"{LONG_PHASE_TIMES:g} x the longest {self.phase} before" if self.phase in self.longest else \
                "trainer.collective_timeout_s, the first of its kind"
        if self.steps < WARMUP_STEPS:
            return "trainer.first_step_timeout_s, the first steps of an attempt"
        source = "trainer.hang_timeout_s" if lim.hang_timeout_s is not None else \
            f"trainer.hang_timeout_s auto: the larger of {AUTO_FLOOR_S:g} s and {AUTO_STEPS:g} x the median step"
        if lim.reads_s > (lim.hang_timeout_s or AUTO_FLOOR_S):
            source += ", or a stalled read's own bound (data.io_timeout, data.read_retries)"
        return source

    def _who_did_not_arrive(self) -> dict:
        """Lines naming the ranks that did not arrive (and the rest), from two reads of the board a few beats
        apart: a rank whose heartbeat did not move is frozen; one waiting for data for long did not bring its
        batch; one whose last step is behind the others' never reached this one."""
        if self.board is None:
            return {"lines": [] if self.world_size == 1 else
                    ["no board to read the other ranks from: see their own logs"], "culprits": [], "nodes": []}
        try:
            first = self.board.read()
            time.sleep(2.5 * self.beat_s())
            second = self.board.read()
        except Exception as err:
            return {"lines": [f"the board did not answer ({type(err).__name__}: {err}); its host may be frozen"],
                    "culprits": [], "nodes": []}
        newest = max((b.get("images", 0) for b in second.values()), default=0)
        culprits, waiting, nodes = [], [], []
        for rank in range(self.world_size):
            beat = second.get(rank)
            if beat is None:
                culprits.append(f"rank {rank}: never posted a heartbeat")
                continue
            ray_node = f", Ray node {beat['node_id']}" if beat.get("node_id") else ""
            where = (f"rank {rank} (node {beat.get('node', '?')}, {beat.get('address', '?')}, pid {beat.get('pid')}"
                     f"{ray_node}, last step done at {beat.get('images')} images)")
            before = first.get(rank)
            if before is not None and before.get("seq") == beat.get("seq"):
                why = f"no sign of life for over {2.5 * self.beat_s():.0f} s (stopped, or stuck outside Python)"
            elif beat.get("phase") == DATA and beat.get("phase_s", 0) > self.beat_s():
                why = f"waiting for its next batch for {beat.get('phase_s'):.0f} s (a read or a loader worker)"
            elif beat.get("images", 0) < newest:
                why = "behind the others"
            else:
                waiting.append(f"{where}: in phase {beat.get('phase')!r} for {beat.get('phase_s'):.0f} s")
                continue
            culprits.append(f"{where}: {why}")
            nodes.append(beat.get("node_id") or beat.get("node"))
        lines = []
        if culprits:
            lines.append("did not arrive: " + "; ".join(culprits))
        if waiting:
            lines.append("waiting for them: " + "; ".join(waiting))
        return {"lines": lines, "culprits": culprits, "nodes": [n for n in nodes if n]}

    def _stacks(self) -> str:
        """Every thread of this process, then each loader worker's (or its state when it cannot answer)."""
        with tempfile.TemporaryFile("w+") as f:
            faulthandler.dump_traceback(file=f, all_threads=True)
            f.seek(0)
            parts = [f"--- rank {self.rank}, pid {os.getpid()}: every thread\n{f.read()}"]
        me = os.getpid()
        children = {p: proc for p, proc in sorted(processes.processes().items()) if proc.ppid == me}
        processes.send(children, LOADER_DUMP_SIGNAL)
        time.sleep(1.0)
        for pid, child in children.items():
            state = _STATES.get(child.state, child.state) + f" ({child.state})"
            dump = Path(self.loader_dumps, f"{pid}.txt")
            text = dump.read_text() if dump.is_file() else ""
            if not text.strip():
                text = f"(no stacks: state {state}{'; a stopped process cannot answer' if 'stopped' in state else ''})"
            parts.append(f"--- rank {self.rank}, child pid {pid} ({state})\n{text}")
        return "\n".join(parts)

    def _write(self, report: str) -> Path | None:
        """run_dir/hangs/<UTC time>-rank<R>.txt (every rank writes its own; the run directory's only shared folder)."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        path = self.hangs_dir / f"{stamp}-rank{self.rank}.txt"
        try:
            self.hangs_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(report + "\n")
            return path
        except OSError as err:
            print(f"dcgan_dist.watchdog: cannot write {path}: {err}", file=sys.stderr, flush=True)
            return None


def _end_process(status: int) -> None:
    """This process, now, its loader workers first (a stopped child would outlive it, stopped for ever)."""
    processes.kill_children(wait=2.0)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


# A loader worker's state as the report names it ('stopped (T)': a stopped process cannot dump its stacks).
_STATES = {"R": "running", "S": "sleeping", "D": "in an uninterruptible wait", "T": "stopped", "t": "stopped"}


def loader_worker_init(dump_dir: str, _worker_id: int) -> None:
    """DataLoader worker_init_fn (with functools.partial): in a loader worker: the trainer answers the signals, and on LOADER_DUMP_SIGNAL this worker writes its
    stacks where its rank's watchdog reads them."""
    ignore_in_loader_workers()
    dump = open(Path(dump_dir, f"{os.getpid()}.txt"), "w")  # kept open for the worker's life: faulthandler's file
    faulthandler.register(LOADER_DUMP_SIGNAL, file=dump, all_threads=True)


def nccl_dump(hangs_dir: Path, rank: int) -> Path | None:
    """NCCL's flight recorder (the collectives each rank has in flight) as a pickle next to the report, when this
    process has an NCCL group; None otherwise."""
    try:
        import torch.distributed as torch_dist
        if not (torch_dist.is_initialized() and torch_dist.get_backend() == "nccl"):
            return None
        from .private_api import nccl_flight_record
        data = nccl_flight_record()
    except Exception as err:
        print(f"dcgan_dist.watchdog: NCCL flight recorder unavailable: {type(err).__name__}: {err}",
              file=sys.stderr, flush=True)
        return None
    path = hangs_dir / f"nccl-trace-rank{rank}.pkl"
    path.write_bytes(data)
    return path


class StoreBoard:
    """The board in torchrun's agent store (it outlives every rank; without an agent, rank 0 serves the store and
    a frozen rank 0 is told by a board that does not answer), through a connection of the watchdog's own."""

    def __init__(self, host: str, port: int, prefix: str, world_size: int, timeout_s: float = 5.0):
        self.host, self.port, self.prefix, self.world_size, self.timeout_s = host, port, prefix, world_size, timeout_s
        self._store, self._lock = None, threading.Lock()  # one connection, used by the heartbeat and the report

    def _client(self):
        if self._store is None:
            import torch.distributed as torch_dist
            self._store = torch_dist.TCPStore(self.host, self.port, is_master=False, wait_for_workers=False,
                                              timeout=timedelta(seconds=self.timeout_s))
        return self._store

    def post(self, rank: int, beat: dict) -> None:
        with self._lock:
            self._client().set(f"{self.prefix}beat/{rank}", json.dumps(beat))

    def read(self) -> dict[int, dict]:
        out = {}
        with self._lock:
            store = self._client()
            for rank in range(self.world_size):
                key = f"{self.prefix}beat/{rank}"
                if store.check([key]):
                    out[rank] = json.loads(store.get(key))
        return out

    def hung(self, report: dict) -> None:
        with self._lock:
            self._client().set(f"{self.prefix}hung/{report['rank']}", json.dumps(report))
