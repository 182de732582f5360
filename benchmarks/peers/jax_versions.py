"""Did another jax/jaxlib change XLA:CPU's speed? benchmarks/cpu_forward.py's bonejax figures
under two Python environments, side by side in one run.

    python benchmarks/peers/jax_versions.py --other_python=/tmp/venv312/bin/python
    python benchmarks/peers/jax_versions.py --other_python=/tmp/venv312/bin/python --size=128

Python 3.11 resolves bonejax's dependencies to jax 0.10.2, Python 3.12 to jax 0.12.x (issue
25). One `cpu_forward.py --worker=bonejax` process per interpreter (this one and
`--other_python`, which needs bonejax's dependencies installed), both alive; the driver asks
them in turn for one timed forward call of each variant (fp32, bf16, graph fp32, graph bf16;
`--policy=auto`, no measuring), `--repeats` rounds, order reversed every other round.
Medians; the ratio column divides the other environment's images/s by this one's.
Writes benchmarks/results/jax_versions_<machine>.{json,md}.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from absl import flags  # noqa: E402

from benchmarks import common, cpu_workers  # noqa: E402
from bonejax.cli import runner  # noqa: E402

CPU_FORWARD = str(Path(__file__).resolve().parents[1] / "cpu_forward.py")

_OTHER = flags.DEFINE_string("other_python", None, "The other environment's python.")
_BATCH = flags.DEFINE_integer("batch", 4, "Images per forward call.")
_SIZE = flags.DEFINE_integer("size", 256, "Image side in pixels.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Rounds over all variants.")
_POLICY = flags.DEFINE_string("policy", "auto", "Lowering policy of the graph variants.")
_RESULTS = flags.DEFINE_string("results_dir", str(common.RESULTS), "Where result files go.")


class _Worker(cpu_workers.Worker):
  def __init__(self, python: str, label: str, argv: list[str]):  # pylint: disable=super-init-not-called
    self.side = label
    self.proc = subprocess.Popen([python, CPU_FORWARD, "--worker=bonejax"] + argv,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 cwd=common.REPO)


def main(argv):
  del argv
  argv = [f"--batch={_BATCH.value}", f"--size={_SIZE.value}", f"--policy={_POLICY.value}"]
  load = [common.load_average()]
  workers, ready = {}, {}
  for label, python in (("this", sys.executable), ("other", _OTHER.value)):
    workers[label] = _Worker(python, label, argv)
    ready[label] = workers[label].read()
    print(f"{label}: jax {ready[label].get('jax')} ready", file=sys.stderr, flush=True)
  order = [(label, v) for label in workers for v in ready[label]["ready"]]
  times = {k: [] for k in order}
  for r in range(_REPEATS.value):
    for label, v in (order if r % 2 == 0 else order[::-1]):
      times[(label, v)].append(workers[label].time(v, 1))
  for w in workers.values():
    w.close()
  load.append(common.load_average())
  rows = []
  for v in ready["this"]["ready"]:
    a = common.median(times[("this", v)])
    b = common.median(times[("other", v)]) if ("other", v) in times else None
    rows.append({"variant": v, "this": _BATCH.value / a, "other": _BATCH.value / b if b else None,
                 "ratio": a / b if b else None})
  info = common.machine()
  jax_this, jax_other = ready["this"].get("jax"), ready["other"].get("jax")
  md = "\n".join([
      f"# cpu_forward's bonejax variants, jax {jax_this} vs jax {jax_other}: {info['tag']}", "",
      common.machine_line(info), "", f"Load average at start / end: {load[0]} / {load[1]} "
      "(a shared machine: other jobs ran beside this one).", "",
      f"`unet_resnet18` {_BATCH.value} x {_SIZE.value}^2, policy `{_POLICY.value}`, medians of "
      f"{_REPEATS.value} interleaved rounds; python {sys.version.split()[0]} (jax {jax_this}) "
      f"vs {_OTHER.value} (jax {jax_other}).", "",
      common.markdown_table(rows, ["variant", "this", "other", "ratio"],
                            ["variant", f"jax {jax_this} images/s", f"jax {jax_other} images/s",
                             f"{jax_other} / {jax_this}"])])
  print(md)
  paths = common.write_results("jax_versions", {
      "rows": rows, "times": {f"{k[0]}|{k[1]}": t for k, t in times.items()},
      "ready": ready, "load_average": load, "machine": info}, md, tag=info["tag"],
      results_dir=_RESULTS.value)
  return {"md": paths["md"], "rows": rows}


if __name__ == "__main__":
  runner.run(main)
