"""Starting and restarting a run: fresh or resumed, by hand (``--resume``) or under torch's elastic agent.

Under the elastic launch (``launch.sh --elastic``, docs/elastic.md) every worker gets ``DS_FACE_ELASTIC_RUN=<run
id>``, and the agent restarts all workers after a node is lost or joins. So that a restart needs no person:

* the first start of the launch records the id in ``<output.dir>/elastic_run``;
* a start whose output.dir holds checkpoints of the SAME id resumes `latest` by itself (any world size);
* checkpoints of another run (another id, or none recorded) are refused as without the elastic launch, unless
  ``--resume`` is given: then the launch adopts them, and its own restarts resume them too.

Rank 0 also keeps ``<output.dir>/last_step.json`` (step, samples, wall time, world size) after every step, so that
a recovery can say what it redoes and how long the run stood still.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from ds_face.config import ConfigError
from ds_face.config.bounded import NotARegularFile, read_at_most
from ds_face.fileio import write_atomic
from ds_face.runtime.progress import log

ELASTIC_ENV = "DS_FACE_ELASTIC_RUN"  # set by the elastic launch for every worker: the launch's run id
RUN_ID_FILE = "elastic_run"  # in output.dir: the id of the elastic launch whose checkpoints these are
LAST_STEP_FILE = "last_step.json"  # in output.dir: rank 0's newest optimizer step
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # a rendezvous id and a word in output.dir: nothing a shell reads


def elastic_run_id() -> str | None:
    """The elastic launch's run id (``DS_FACE_ELASTIC_RUN``), or None outside one."""
    value = os.environ.get(ELASTIC_ENV)
    if value is None:
        return None
    if not RUN_ID.fullmatch(value):
        raise ConfigError(f"{ELASTIC_ENV}={value[:140]!r}: expected 1-64 characters of A-Z a-z 0-9 _ . -, "
                          f"the first a letter or digit")
    return value


def _read_small(path: Path) -> bytes | None:
    """A small file of ds_face's own in output.dir, bounded and never through a link; None if absent."""
    if not os.path.lexists(path):
        return None
    try:
        return read_at_most(path, 4096, follow_links=False)
    except (NotARegularFile, OSError) as err:
        raise ConfigError(f"{path}: not a regular file ds_face wrote ({err}); remove it or set another "
                          f"output.dir") from None


def recorded_run_id(output_dir: Path) -> str | None:
    data = _read_small(output_dir / RUN_ID_FILE)
    if data is None:
        return None
    text = data.decode("ascii", errors="replace").strip()
    return text if RUN_ID.fullmatch(text) else None


def should_resume(resume_flag: bool, output_dir: Path, has_checkpoint: bool, run_id: str | None) -> bool:
    """Whether this start resumes `latest` (see the module's docstring); a ConfigError says why it cannot start."""
    checkpoints = output_dir / "checkpoints"
    if resume_flag or not has_checkpoint:
        return resume_flag  # --resume without a checkpoint: the checkpoint reader names what is missing
    recorded = recorded_run_id(output_dir) if run_id else None
    if run_id and recorded == run_id:
        return True  # a restart of this elastic launch
    owner = (f" (elastic run {recorded}, not this launch's {run_id})" if recorded
             else " (not started by this elastic launch)" if run_id else "")
    raise ConfigError(f"{checkpoints} already holds checkpoints{owner}; pass --resume to continue that run, "
                      f"or set another output.dir (nothing was overwritten)")


def record_run_id(output_dir: Path, run_id: str) -> None:
    """Rank 0, at every start of an elastic launch: its checkpoints are this launch's from now on."""
    write_atomic(output_dir / RUN_ID_FILE, (run_id + "\n").encode())


class StepLog:
    """Rank 0 under the elastic launch: ``last_step.json`` after every optimizer step (not fsynced: it only
    reports), and, after a resume, how much was redone and how long the run stood still, logged once."""

    def __init__(self, output_dir: Path):
        self.path = output_dir / LAST_STEP_FILE
        self.before = self._read()  # the previous start's newest step, if any
        self.resumed: dict | None = None

    def _read(self) -> dict | None:
        try:
            data = _read_small(self.path)
            value = json.loads(data) if data is not None else None
        except (ConfigError, ValueError):
            return None
        ok = isinstance(value, dict) and all(isinstance(value.get(k), (int, float)) and not isinstance(value.get(k), bool)
                                             for k in ("step", "samples", "time", "world_size"))
        return value if ok else None

    def resumed_from(self, meta: dict, world_size: int, layout: str) -> None:
        """Log the transition: old and new world size, layout, the checkpoint, what is redone."""
        self.resumed = meta
        redo = ""
        if self.before and self.before["step"] >= meta["global_step"]:
            redo = (f"; redoing {int(self.before['step']) - meta['global_step']} step(s), "
                    f"{int(self.before['samples']) - meta['samples_seen']} samples, trained after it")
        old = int(self.before["world_size"]) if self.before else meta["world_size"]  # the round that failed
        log.info(f"recovery: world size {old} -> {world_size} ({layout}); resumed {meta['tag']} (step "
                 f"{meta['global_step']}, {meta['samples_seen']} samples, saved on {meta['world_size']} rank(s)){redo}")

    def __call__(self, report) -> None:
        now = time.time()
        if self.resumed is not None and self.before is not None:
            log.info(f"recovery: first step after it, {now - self.before['time']:.1f} s after the last step "
                     f"before it (step {int(self.before['step'])})")
        self.resumed = self.before = None
        write_atomic(self.path, json.dumps({"step": report.step, "samples": report.samples, "time": now,
                                            "world_size": report.world_size}).encode(), durable=False)
