"""The run store: every step of the lifecycle is a run, and runs are how stages hand work on.

Layout, inside the project folder::

    runs/
      index.sqlite                 # an index for fast listing; rebuilt from the run folders if lost
      <run-id>/
        run.json                   # id, stage, variant, parent, status, resolved config, versions, git rev
        metrics.jsonl              # one JSON object per logged step
        summary.json               # final figures, written when the run completes
        artifacts/                 # what the run produced (a model folder, outputs, ...)

Paths inside the project folder are recorded relative to it (summaries, model pointers, checkpoints),
so a project can be moved or copied and its runs still resolve; what lies outside stays absolute.

The run folder is the source of truth; the SQLite index only speeds up queries. Every file is written
atomically (temporary file + os.replace), so a killed process leaves either the old or the new file,
never half of one. A run whose process died while "running" is reported as "incomplete".
SQLite in WAL mode with a busy timeout lets several processes record runs at once.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from llmcycle.core.errors import UserError, suggest

STORE_DIRNAME = "runs"
INDEX_NAME = "index.sqlite"
# A run whose model lives elsewhere (a select candidate that is a Hub id, a folder or another run's
# model; the select run `best`) writes this in its artifacts instead of a copy: {"model": path or id}.
MODEL_REF = "model_ref.json"
TERMINAL = ("completed", "failed", "incomplete")


def atomic_write_text(path: Path, text: str) -> None:
    """Write a whole file or nothing: a reader (or a crash) never sees half of it."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(3)}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # left behind only when the write or the rename failed


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def package_versions() -> dict[str, str]:
    """Versions of the stack a run used, so a result can be reproduced later."""
    from importlib import metadata

    import llmcycle

    out = {"python": sys.version.split()[0], "llmcycle": llmcycle.__version__}
    for name in ("torch", "transformers", "datasets", "tokenizers", "peft", "trl", "accelerate"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_revision(path: Path) -> str | None:
    """The project's git commit (with '-dirty' when it has uncommitted changes), or None."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True,
                             text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=path, capture_output=True,
                               text=True, timeout=5).stdout.strip()
        return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _process_started(pid: int | None = None) -> float | None:
    """When a process started (seconds since the epoch), or None when that cannot be read. psutil comes
    with accelerate; it reads this on Linux, macOS and Windows alike."""
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001 - no such process, no permission, or no psutil: unknown
        return None


def _process_identity() -> dict:
    """What identifies this process later: its PID and when it started (a PID alone is reused)."""
    return {"pid": os.getpid(), "pid_started": _process_started(), "host": socket.gethostname()}


def _pid_alive(pid: int, started: float | None = None) -> bool:
    """Whether the process that recorded a run still runs: its PID exists and, when the run recorded
    the process's start time, the process with that PID started then (not a later one reusing it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if started is None:
        return True
    now_started = _process_started(pid)
    return now_started is None or abs(now_started - started) < 1.0


@dataclass
class RunRecord:
    """What the store knows about one run (read from its run.json)."""

    id: str
    stage: str
    variant: str
    status: str
    dir: Path
    parent: str | None = None
    created: float = 0.0
    finished: float | None = None
    content_hash: str | None = None
    config: dict = field(default_factory=dict)
    error: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def artifacts(self) -> Path:
        return self.dir / "artifacts"

    def summary(self) -> dict:
        path = self.dir / "summary.json"
        if not path.exists():
            return {}
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def metrics(self) -> list[dict]:
        path = self.dir / "metrics.jsonl"
        if not path.exists():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                # A kill during an append can leave a partial last line; the rest is still good.
                continue
        return rows

    def to_dict(self) -> dict:
        return {"id": self.id, "stage": self.stage, "variant": self.variant, "status": self.status,
                "parent": self.parent, "created": self.created, "finished": self.finished,
                "content_hash": self.content_hash, "dir": str(self.dir), "error": self.error}


class Run:
    """A run being recorded. Use through RunStore.start(...) as a context manager: an exception marks
    it failed (the error kept in run.json), a normal exit without finish() marks it incomplete."""

    def __init__(self, store: "RunStore", record: RunRecord):
        self.store = store
        self.record = record

    id = property(lambda self: self.record.id)
    dir = property(lambda self: self.record.dir)

    @property
    def artifacts(self) -> Path:
        path = self.record.artifacts
        path.mkdir(exist_ok=True)
        return path

    def log(self, metrics: dict) -> None:
        """Append one line to metrics.jsonl (one write call per line, so lines never interleave)."""
        line = json.dumps({"time": round(time.time(), 3), **metrics}, default=str) + "\n"
        with open(self.dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(line)

    def rewind(self, step: int) -> dict:
        """A resume from the checkpoint of `step`: metrics rows logged after it (the steps about to be
        redone) are dropped, so curves do not double back, and the resume is recorded in run.json."""
        rows = self.record.metrics()
        kept = [r for r in rows if not isinstance(r.get("step"), int) or r["step"] <= step]
        if len(kept) != len(rows):
            atomic_write_text(self.dir / "metrics.jsonl", "".join(json.dumps(r, default=str) + "\n" for r in kept))
        resumed = {"step": step, "time": round(time.time(), 3), "dropped_metrics_rows": len(rows) - len(kept)}
        self.record.meta["resumed_from"] = resumed
        self.store._write_record(self.record)
        return resumed

    def finish(self, summary: dict) -> None:
        atomic_write_json(self.dir / "summary.json", self.store.portable_tree(summary))
        self.store._set_status(self.record, "completed")

    def fail(self, error: str, status: str = "failed") -> None:
        self.record.error = error
        self.store._set_status(self.record, status)


class RunStore:
    """Runs of one project, kept in `<project dir>/runs`."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @classmethod
    def for_project(cls, project_dir: Path) -> "RunStore":
        return cls(Path(project_dir) / STORE_DIRNAME)

    # -- index -------------------------------------------------------------------------------
    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        self.root.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.root / INDEX_NAME, timeout=30, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS runs (id TEXT PRIMARY KEY, stage TEXT, variant TEXT,"
                " status TEXT, parent TEXT, created REAL, finished REAL, content_hash TEXT)")
            yield conn
        finally:
            conn.close()

    def _index(self, rec: RunRecord) -> None:
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO runs VALUES (?,?,?,?,?,?,?,?)",
                       (rec.id, rec.stage, rec.variant, rec.status, rec.parent, rec.created,
                        rec.finished, rec.content_hash))

    def _write_record(self, rec: RunRecord) -> None:
        data = rec.to_dict()
        data.pop("dir")
        data["config"] = rec.config
        data.update(rec.meta)
        atomic_write_json(rec.dir / "run.json", data)
        self._index(rec)

    def _set_status(self, rec: RunRecord, status: str) -> None:
        rec.status = status
        rec.finished = time.time() if status in TERMINAL else None
        self._write_record(rec)

    def reindex(self) -> int:
        """Rebuild the index from the run folders (the source of truth). Returns the run count."""
        records = self._scan()
        with self._db() as db:
            db.execute("DELETE FROM runs")
        for rec in records:
            self._index(rec)
        return len(records)

    def indexed(self) -> list[dict]:
        """The index's rows (id, stage, variant, status, parent), oldest first: it can name runs whose
        folders are gone, which a scan of the folders cannot. Empty when there is no index."""
        if not (self.root / INDEX_NAME).exists():
            return []  # reading must not create a store
        with self._db() as db:
            rows = db.execute("SELECT id, stage, variant, status, parent FROM runs ORDER BY created").fetchall()
        return [dict(zip(("id", "stage", "variant", "status", "parent"), row)) for row in rows]

    # -- reading -----------------------------------------------------------------------------
    def _load(self, run_dir: Path) -> RunRecord | None:
        try:
            data = json.loads((run_dir / "run.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None
        known = {"id", "stage", "variant", "status", "parent", "created", "finished",
                 "content_hash", "config", "error"}
        rec = RunRecord(id=data["id"], stage=data["stage"], variant=data["variant"],
                        status=data["status"], dir=run_dir, parent=data.get("parent"),
                        created=data.get("created", 0.0), finished=data.get("finished"),
                        content_hash=data.get("content_hash"), config=data.get("config", {}),
                        error=data.get("error"),
                        meta={k: v for k, v in data.items() if k not in known})
        if rec.status == "running" and rec.meta.get("host") == socket.gethostname() \
                and not _pid_alive(int(rec.meta.get("pid", 0)), rec.meta.get("pid_started")):
            # Its process is gone without finishing: killed or crashed hard.
            rec.status = "incomplete"
            rec.error = rec.error or "the process recording this run stopped before it finished"
        return rec

    def _scan(self) -> list[RunRecord]:
        if not self.root.exists():
            return []
        out = [self._load(p) for p in self.root.iterdir() if (p / "run.json").exists()]
        return sorted((r for r in out if r is not None), key=lambda r: r.created)

    def list(self, stage: str | None = None, variant: str | None = None,
             status: str | None = None) -> list[RunRecord]:
        """Runs in creation order, filtered. Reads the run folders, so it is always current."""
        runs = self._scan()
        return [r for r in runs if (stage is None or r.stage == stage)
                and (variant is None or r.variant == variant)
                and (status is None or r.status == status)]

    def get(self, ref: str) -> RunRecord:
        """A run by id, unique id prefix, `latest`, or `STAGE/VARIANT` (its latest completed run)."""
        runs = self._scan()
        if not runs and "/" not in ref:
            raise UserError(f"run '{ref}' not found: the run store {self.root} has no runs yet")
        if ref == "latest":
            return runs[-1]
        if "/" in ref:
            stage, variant = ref.split("/", 1)
            done = [r for r in runs if r.stage == stage and r.variant == variant
                    and r.status == "completed"]
            if not done:
                raise UserError(f"no completed run of stage '{stage}' variant '{variant}' in {self.root} "
                                f"(run `llmcycle {stage}` first, or `llmcycle run`)")
            return done[-1]
        exact = [r for r in runs if r.id == ref]
        if exact:
            return exact[0]
        matches = [r for r in runs if r.id.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise UserError(f"run id '{ref}' is ambiguous: " + ", ".join(r.id for r in matches[:5]))

        raise UserError(f"run '{ref}' not found in {self.root}{suggest(ref, [r.id for r in runs])}")

    def resolve_model(self, ref: str) -> Path | str:
        """The model folder a run produced (`artifacts/model`), for `model: run:REF` references; for a
        run that refers to a model kept elsewhere (artifacts/model_ref.json), that folder or Hub id."""
        rec = self.get(ref)
        path = rec.artifacts / "model"
        if rec.status != "completed":
            raise UserError(f"run {rec.id} is {rec.status}; only a completed run's model can be used")
        pointer = rec.artifacts / MODEL_REF
        if pointer.is_file():
            try:
                data = json.loads(pointer.read_text())
                target = str((self.project_dir / data["path"]).resolve()) if data.get("path") else data["model"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise UserError(f"run {rec.id}: {pointer} is unreadable ({exc}); run its stage again") from None
            if data.get("endpoint"):  # a select candidate measured through an API: nothing here to load
                raise UserError(f"run {rec.id} measured the model {target!r} behind the endpoint {data['endpoint']}, "
                                "which has no local weights to load, tune or serve; choose a candidate with local "
                                "weights (select.pick) or evaluate the endpoint with `llmcycle eval --endpoint`")
            if Path(target).is_absolute():
                if not Path(target).exists():
                    raise UserError(f"run {rec.id} refers to the model folder {target}, which no longer "
                                    "exists; run its stage again")
                return Path(target)
            return target  # a Hub id
        if not ((path / "config.json").exists() or (path / "adapter_config.json").exists()):
            raise UserError(f"run {rec.id} ({rec.stage}) has no model folder at {path}")
        return path

    def model_pointer(self, model: str | Path, run: str | None = None) -> dict:
        """What MODEL_REF holds for a model kept elsewhere: a folder inside the project as "path"
        (relative to it), anything else (a folder outside, a Hub id) as "model"."""
        portable = self.portable(model)
        if Path(str(model)).is_absolute() and not Path(portable).is_absolute():
            return {"path": portable, "run": run}
        return {"model": str(model), "run": run}

    def find_cached(self, stage: str, variant: str, content_hash: str) -> RunRecord | None:
        """The latest completed run of this stage/variant with the same config and inputs."""
        for rec in reversed(self.list(stage, variant, "completed")):
            if rec.content_hash == content_hash:
                return rec
        return None

    # -- paths -------------------------------------------------------------------------------
    @property
    def project_dir(self) -> Path:
        return self.root.parent

    def portable(self, path: str | Path) -> str:
        """`path` relative to the project folder when it lies inside it (as posix), else unchanged."""
        text = str(path)
        if not Path(text).is_absolute():
            return text
        try:
            return Path(text).resolve().relative_to(self.project_dir.resolve()).as_posix()
        except ValueError:
            return text

    def portable_tree(self, data: Any) -> Any:
        """`data` with every string that names an existing absolute path inside the project made
        relative to it (summaries are written this way, so they survive a moved project)."""
        if isinstance(data, dict):
            return {k: self.portable_tree(v) for k, v in data.items()}
        if isinstance(data, (list, tuple)):
            return [self.portable_tree(v) for v in data]
        if isinstance(data, str) and data.startswith(os.sep) and "\n" not in data and os.path.exists(data):
            return self.portable(data)
        return data

    # -- writing -----------------------------------------------------------------------------
    def _new_id(self, stage: str, variant: str) -> str:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return f"{stage}-{variant}-{stamp}-{secrets.token_hex(2)}"

    def create(self, stage: str, variant: str, config: dict, *, parent: str | None = None,
               content_hash: str | None = None, project_dir: Path | None = None) -> Run:
        """Record a new run (status running) before any work starts."""
        self.root.mkdir(parents=True, exist_ok=True)
        while True:
            run_id = self._new_id(stage, variant)
            run_dir = self.root / run_id
            try:
                run_dir.mkdir()  # exclusive: two processes never share a folder
                break
            except FileExistsError:
                continue
        rec = RunRecord(id=run_id, stage=stage, variant=variant, status="running", dir=run_dir,
                        parent=parent, created=time.time(), content_hash=content_hash,
                        config=config,
                        meta={**_process_identity(), "versions": package_versions(),
                              "git_revision": git_revision(project_dir or self.root.parent),
                              "command": " ".join(sys.argv)})
        self._write_record(rec)
        return Run(self, rec)

    def reopen(self, ref: str) -> Run:
        """Continue an unfinished run (for --resume): same folder, status running again."""
        rec = self.get(ref)
        if rec.status == "completed":
            raise UserError(f"run {rec.id} already completed; nothing to resume")
        if rec.status == "running":
            raise UserError(f"run {rec.id} is still running (pid {rec.meta.get('pid')})")
        rec.meta.update(**_process_identity(), resumed=rec.meta.get("resumed", 0) + 1)
        rec.error = None
        self._set_status(rec, "running")
        return Run(self, rec)

    def latest_unfinished(self, stage: str, variant: str) -> RunRecord | None:
        runs = [r for r in self.list(stage, variant) if r.status in ("failed", "incomplete")]
        return runs[-1] if runs else None

    @contextmanager
    def start(self, stage: str, variant: str, config: dict, *, parent: str | None = None,
              content_hash: str | None = None, resume_ref: str | None = None,
              project_dir: Path | None = None) -> Iterator[Run]:
        """Create (or reopen) a run and make sure it ends in a terminal status whatever happens. A resume
        the stage refuses (a UserError before it logged a step) leaves the run's record as it was."""
        before = self.get(resume_ref) if resume_ref else None
        steps_before = len(before.metrics()) if before is not None else 0
        run = self.reopen(resume_ref) if resume_ref else self.create(
            stage, variant, config, parent=parent, content_hash=content_hash,
            project_dir=project_dir)
        try:
            yield run
        except KeyboardInterrupt:
            run.fail("interrupted", status="incomplete")
            raise
        except BaseException as exc:  # noqa: BLE001 - recorded, then re-raised unchanged
            refused = isinstance(exc, UserError) and before is not None \
                and len(run.record.metrics()) == steps_before
            if refused:
                self._write_record(before)  # a resume refused before any work: its status and error stay
            else:
                run.fail(f"{type(exc).__name__}: {exc}")
            raise
        else:
            if run.record.status == "running":
                run.fail("the stage returned without a result", status="incomplete")
