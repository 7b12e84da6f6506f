"""Training callbacks: what the training loop calls between steps, apart from the protocols they run
(arcface_torch keeps its callbacks apart from ``eval/verification.py`` too)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ds_face.eval.bin_sets import VerificationSet
from ds_face.eval.verification import evaluate, set_names
from ds_face.fileio import real_dir, write_json_atomic
from ds_face.eval.inference import EvalTimeout
from ds_face.runtime.cpus import worker_processes
from ds_face.runtime.dist import collective_timeout
from ds_face.runtime.progress import log


class TrainingEvaluator:
    """The ``eval:`` block of the run YAML during training: every ``eval.every_steps`` optimizer steps and at
    the last step, rank 0 evaluates the backbone on each set while the other ranks wait.

    The wait is a broadcast from rank 0 (a collective under the process-group timeout, DS_FACE_TIMEOUT_MIN,
    default 30 min), which also carries "rank 0 failed", so that every rank stops instead of hanging. To stay
    under that timeout, rank 0 gives up on the remaining sets (warning) once half of it has passed.
    Unsupported under ZeRO-3 (parameters partitioned; ``check_together`` refuses the combination)."""

    def __init__(self, cfg, rank: int, directory: Path, model, device, step: int, writer=None):
        """``cfg``: the run YAML's ``eval`` block; ``directory``: where the reports go (output.dir/eval);
        ``model``: the backbone (evaluated in place); ``step``: the run's step now (a resume's best so far is
        read back up to it); ``writer``: rank 0's tensorboard writer, if any."""
        self.cfg, self.rank, self.dir, self.model, self._device, self.writer = cfg, rank, directory, model, device, writer
        self.enabled = bool(self.cfg.sets) or bool(self.cfg.ijb.root)
        self.sets: list[VerificationSet] = []
        self.ijb = None  # ds_face.ijb.IJBMeta: eval.ijb, parsed once, evaluated at the last step
        self.best: dict[str, float] = {}
        self.budget = 0.5 * collective_timeout().total_seconds()
        if not self.enabled:
            return
        error = None
        if self.rank == 0:
            try:  # decoded once, kept for every evaluation
                real_dir(self.dir)  # checked now, not after hours of training: a link there is refused, named
                self.sets = [VerificationSet.load(path, name)
                             for name, path in zip(set_names(self.cfg.sets), self.cfg.sets)]
                self._restore_best(step)
                if self.sets:
                    log.info("evaluation every " + (f"{self.cfg.every_steps} steps" if self.cfg.every_steps else
                             "run end") + ": " + ", ".join(f"{s.name} ({s.pairs} pairs)" for s in self.sets))
                if self.cfg.ijb.root:  # parsed and checked now (every image present), not after hours of training
                    from ds_face.ijb import read_meta
                    self.ijb = read_meta(self.cfg.ijb.root, self.cfg.ijb.target)
                    log.info(f"IJB evaluation at the end of the run: {self.ijb.target} ({self.ijb.images} images, "
                             f"{len(self.ijb.labels)} pairs) from {self.ijb.root}")
            except Exception as err:
                error = err
        self._agree(error)

    def _agree(self, error: Exception | None) -> None:
        """All ranks wait for rank 0; if it failed, every rank raises."""
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            flag = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=self._device)
            torch.distributed.broadcast(flag, src=0)
            failed = bool(flag.item())
        else:
            failed = error is not None
        if error is not None:
            raise error
        if failed:
            raise RuntimeError("evaluation failed on rank 0 (see its log); stopping this rank too")

    def _restore_best(self, step: int) -> None:
        """After a resume: the best accuracies of evaluations up to ``step`` (from eval/step_*.json)."""
        for path in sorted(self.dir.glob("step_*.json")) if self.dir.is_dir() else []:
            try:
                report = json.loads(path.read_text())
                if report["step"] > step:
                    continue
                for name, r in report["sets"].items():
                    self.best[name] = max(self.best.get(name, 0.0), float(r["accuracy"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue

    def due(self, step: int, last: bool) -> tuple[bool, bool]:
        """(the .bin sets, IJB) due at this step: the sets every eval.every_steps and at the last step; IJB at the
        last step only."""
        sets = bool(self.cfg.sets) and (last or bool(self.cfg.every_steps and step % self.cfg.every_steps == 0))
        return sets, last and bool(self.cfg.ijb.root)

    def __call__(self, step: int, last: bool = False) -> dict | None:
        sets_due, ijb_due = self.due(step, last)
        if not (sets_due or ijb_due):
            return None
        error, results = None, None
        if self.rank == 0:
            try:
                results = self._run(step, sets_due, ijb_due)
            except Exception as err:
                error = err
        self._agree(error)
        return results

    def _run(self, step: int, sets_due: bool, ijb_due: bool) -> dict:
        model = self.model
        deadline = time.monotonic() + self.budget
        results = {}
        for vset in self.sets if sets_due else []:
            try:
                r = evaluate(model, vset, self.cfg.batch_size, deadline=deadline)
            except EvalTimeout as err:
                log.warning(f"[{vset.name}][{step}] evaluation skipped ({err}): half of the process-group "
                            f"timeout DS_FACE_TIMEOUT_MIN has passed and the other ranks are waiting")
                continue
            self.best[vset.name] = max(self.best.get(vset.name, 0.0), r["accuracy"])
            r.update(best_accuracy=self.best[vset.name], path=vset.path)
            results[vset.name] = r
            log.info(f"[{vset.name}][{step}]XNorm: {r['xnorm']:f}")
            log.info(f"[{vset.name}][{step}]Accuracy-Flip: {r['accuracy']:1.5f}+-{r['std']:1.5f}")
            log.info(f"[{vset.name}][{step}]Accuracy-Highest: {self.best[vset.name]:1.5f}")
            if self.writer is not None:
                for key in ("accuracy", "std", "threshold", "xnorm", "best_accuracy"):
                    self.writer.add_scalar(f"eval/{vset.name}/{key}", r[key], step)
        ijb = self._run_ijb(model, step, deadline) if ijb_due and self.ijb is not None else None
        if self.writer is not None:
            self.writer.flush()
        real_dir(self.dir)  # a link at eval/ would send the reports where it points
        write_json_atomic(self.dir / f"step_{step}.json",
                          {"step": step, "sets": results, **({"ijb": ijb} if ijb else {})})
        return {**results, **({ijb["target"]: ijb} if ijb else {})}

    def _run_ijb(self, model, step: int, deadline: float) -> dict | None:
        """eval.ijb at the last step, under the same deadline as the .bin sets; also eval/<target>_step_<N>.png."""
        from ds_face import ijb
        meta = self.ijb
        started = time.perf_counter()
        try:
            feats = ijb.image_features(meta, model, self.cfg.batch_size, self._device,
                                       workers=worker_processes(), deadline=deadline)
        except EvalTimeout as err:
            log.warning(f"[{meta.target}][{step}] IJB evaluation skipped ({err}): half of the process-group "
                        f"timeout DS_FACE_TIMEOUT_MIN has passed and the other ranks are waiting")
            return None
        features_seconds = time.perf_counter() - started
        report, curve = ijb.evaluate_features(meta, feats)
        report["seconds"]["features"] = features_seconds
        for key, point in report["tar_at_far"].items():
            log.info(f"[{meta.target}][{step}]TAR@FAR={key}: {point['tar']:1.5f} (at FPR {point['fpr']:.2e})")
            if self.writer is not None:
                self.writer.add_scalar(f"eval/{meta.target}/tar@far={key}", point["tar"], step)
        log.info(f"[{meta.target}][{step}]AUC: {report['auc']:1.5f}")
        if self.writer is not None:
            self.writer.add_scalar(f"eval/{meta.target}/auc", report["auc"], step)
        real_dir(self.dir)
        ijb.plot_roc(self.dir / f"{meta.target}_step_{step}.png", curve, report, f"{meta.target} step {step}")
        return report
