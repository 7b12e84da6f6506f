"""``python -m tests.elastic_worker ARGS``: ``ds_face.train ARGS`` exactly, which also appends every optimizer step
it takes to a file, one JSON line per step, so that a test can read it after the process was SIGKILLed.

``DS_FACE_TEST_LEDGER=DIR``: each worker process writes ``DIR/rank<R>_pid<P>.jsonl``; each line holds the step,
samples seen after it, its loss and LR, the world size, this rank, the wall time, and ``rows``: the (epoch, row)
of every sample this rank trained in the step (``StepReport``, what ``ds_face.train.main(on_step=...)`` hands
over). A line cut by a kill is the last of its file; ``read_steps`` skips it.
"""
import json
import os
import time
from pathlib import Path


def recorder(directory: str):
    rank = int(os.environ.get("RANK", 0))
    sink = open(Path(directory) / f"rank{rank}_pid{os.getpid()}.jsonl", "a", buffering=1)

    def on_step(report) -> None:
        sink.write(json.dumps({"step": report.step, "samples": report.samples, "loss": report.loss, "lr": report.lr,
                               "world": report.world_size, "rank": rank, "pid": os.getpid(), "time": time.time(),
                               "rows": report.trained.T.tolist()}) + "\n")
    return on_step


def read_steps(directory) -> list[dict]:
    """Every complete line of every worker's file, in time order."""
    records = []
    for path in Path(directory).glob("rank*_pid*.jsonl"):
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # the last line of a worker killed while writing it
                pass
    return sorted(records, key=lambda r: r["time"])


def kept_steps(records: list[dict]) -> dict[int, list[dict]]:
    """The steps the run kept, {step: one record per rank}: for each step, the records of the last round of
    workers that took it (a step redone after a loss replaces the lost round's). A round's W ranks take a step
    within a collective of each other; another round takes it only after a restart, seconds later."""
    by_step: dict[int, list[dict]] = {}
    for record in records:
        by_step.setdefault(record["step"], []).append(record)
    kept = {}
    for step, found in sorted(by_step.items()):
        found.sort(key=lambda r: r["time"], reverse=True)
        world = found[0]["world"]
        last_round = found[:world]
        assert sorted(r["rank"] for r in last_round) == list(range(world)), (step, last_round)
        assert all(r["world"] == world for r in last_round), (step, last_round)
        kept[step] = sorted(last_round, key=lambda r: r["rank"])
    return kept


if __name__ == "__main__":
    from ds_face.runtime.dist import exit_without_teardown
    from ds_face.train import main
    exit_without_teardown(main(on_step=recorder(os.environ["DS_FACE_TEST_LEDGER"])))
