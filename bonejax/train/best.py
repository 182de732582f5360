"""The best model so far: a checkpoint of its own (WORKDIR/best, beside WORKDIR/checkpoints), and
the bundle WORKDIR/model exported from it.

The bundle is never written from the training thread's live state: it is exported from the best
checkpoint and tagged with that checkpoint's id, so the two cannot drift apart (connectomics keeps
"latest" and "best" managers the same way). At a new best at step s the trainer
  1. saves the latest checkpoint at s and waits for it (its host JSON says best_step = s);
  2. saves the best checkpoint at s (parameters, BatchNorm statistics; JSON step, scores, id) and
     waits for it;
  3. exports WORKDIR/model from the best checkpoint.
A crash between any two leaves a state that `resume` repairs:
  - after 1: the resumed state is step s itself: saved as the best (2), then exported (3);
  - after 2: the bundle's id is not the best checkpoint's: exported again (3);
  - before 1 ends: the run resumes from an older latest checkpoint; best steps newer than it
    (from the trajectory being replayed) are deleted and the bundle re-exported from the best
    the resumed run knows. Keeping 2 best steps keeps that one while a new one is written.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from bonejax.models import bundle
from bonejax.train.checkpoint import STATE, Checkpoints, read_state


def weights_of(state: dict[str, Any]) -> dict[str, Any]:
  """The part of a train state a model bundle keeps: parameters and BatchNorm statistics."""
  return {"params": state["params"],
          "batch_stats": nnx.filter_state(state["rest"], nnx.BatchStat)}


class BestModel:
  """WORKDIR/best (orbax, 2 steps kept) and WORKDIR/model, exported from it by process 0.

  weights_like: weights_of(an abstract train state), for reading the checkpoint back.
  meta: bundle.make_meta(...) of the run; each export adds train_step, val_scores and
  checkpoint_id.
  """

  def __init__(self, directory: str | Path, bundle_dir: str | Path, weights_like: Any,
               meta: dict[str, Any], primary: bool):
    self.ckpts = Checkpoints(directory, keep=2)
    self.bundle_dir = Path(bundle_dir)
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    self.like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=local),
                             weights_like)
    self.meta, self.primary = dict(meta), primary

  def steps(self) -> list[int]:
    return self.ckpts.steps()

  def save(self, step: int, state: dict[str, Any], scores: dict[str, Any] | None) -> None:
    """Saves the best checkpoint at `step` (replacing one there), then exports the bundle."""
    if step in self.ckpts.steps():
      self.ckpts.delete(step)
    self.ckpts.save(step, weights_of(state),
                    {"step": int(step), "id": uuid.uuid4().hex, "scores": scores})
    self.ckpts.wait()
    self.export(step)

  def export(self, step: int) -> None:
    """Writes WORKDIR/model from the best checkpoint at `step` (process 0 only)."""
    if not self.primary:
      return
    host = self.ckpts.read_host(step)
    w = read_state(self.ckpts.directory / str(step) / STATE, like=self.like)
    meta = dict(self.meta, train_step=int(step), checkpoint_id=host["id"],
                val_scores=_val_scores(host.get("scores")))
    bundle.save_weights(self.bundle_dir, nnx.merge_state(w["params"], w["batch_stats"]), meta)

  def _bundle_id(self) -> str | None:
    try:
      return json.loads((self.bundle_dir / bundle.MODEL_JSON).read_text()).get("checkpoint_id")
    except (OSError, ValueError, AttributeError):
      return None

  def sync(self) -> None:
    """Re-exports the newest best checkpoint unless WORKDIR/model already is that checkpoint."""
    steps = self.ckpts.steps()
    if not steps or not self.primary:
      return
    try:
      if self._bundle_id() != self.ckpts.read_host(steps[-1]).get("id"):
        self.export(steps[-1])
    except Exception as e:  # pylint: disable=broad-except  (a damaged best checkpoint)
      print(f"[train] warning: cannot export the best model from "
            f"{self.ckpts.directory / str(steps[-1])} ({bundle.reason(e)}); {self.bundle_dir} "
            "is left as it is", file=sys.stderr, flush=True)

  def resume(self, step: int | None, host: dict[str, Any], state: dict[str, Any]) -> None:
    """Brings the best checkpoint and the bundle in line with a run resumed at `step`."""
    for s in self.ckpts.steps():
      if step is None or s > step:  # from a trajectory the resumed run replays
        self.ckpts.delete(s)
    best = host.get("best_step")
    if best is not None and best not in self.ckpts.steps():
      if best == step:  # killed after the latest checkpoint of a new best, before the best one
        self.save(best, state, host.get("best_scores"))
      else:
        # E.g. a run begun before best checkpoints existed: its bundle stays as it is.
        print(f"[train] warning: {self.ckpts.directory} has no checkpoint of the best model "
              f"(step {best}); {self.bundle_dir} is left as it is until the next improvement",
              file=sys.stderr, flush=True)
    self.sync()

  def close(self) -> None:
    self.ckpts.close()


def _val_scores(scores: dict[str, Any] | None) -> dict[str, Any]:
  scores = scores or {}
  return {k: scores.get(k) for k in ("loss", "miou_all", "miou_fg", "iou")}
