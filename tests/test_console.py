"""The `bonejax` console command: subcommands run the same code as `python launch/NAME.py`."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bonejax.cli import main as console

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu")


def bonejax_cmd() -> list[str]:
  """The installed console script (pip install -e . puts it beside the interpreter)."""
  exe = shutil.which("bonejax", path=str(Path(sys.executable).parent)) or shutil.which("bonejax")
  assert exe, "the `bonejax` console command is not installed: pip install -e '.[dev]'"
  return [exe]


def run(cmd, **kw):
  return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300, **kw)


def test_every_subcommand_has_a_module_and_a_launch_wrapper():
  for name, (module, _) in console.SUBCOMMANDS.items():
    assert (REPO / "bonejax" / "cli" / f"{module}.py").exists(), name
    wrapper = (REPO / "launch" / f"{module}.py").read_text()
    assert f"from bonejax.cli import {module} as command" in wrapper, name


def test_help_lists_the_subcommands_and_an_unknown_one_is_one_error_line():
  r = run(bonejax_cmd() + ["--help"])
  assert r.returncode == 0 and all(name in r.stdout for name in console.SUBCOMMANDS)
  r = run(bonejax_cmd() + ["segment"])
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [
      f"error: unknown subcommand 'segment'; one of: {', '.join(console.SUBCOMMANDS)}"]


@pytest.mark.parametrize("name", list(console.SUBCOMMANDS))
def test_subcommand_help_shows_its_own_flags(name):
  module = console.SUBCOMMANDS[name][0]
  r = run(bonejax_cmd() + [name, "--help"])
  assert r.returncode == 0, r.stderr[-1500:]
  launch = run([sys.executable, str(REPO / "launch" / f"{module}.py"), "--help"])
  assert launch.returncode == 0
  # The same flags either way (absl lists them by defining module).
  flags_of = lambda text: sorted(l.split(":")[0].strip() for l in text.splitlines()  # noqa: E731
                                 if l.strip().startswith("--"))
  assert flags_of(r.stdout) == flags_of(launch.stdout) and flags_of(r.stdout)


def test_the_console_command_and_the_launch_script_give_the_same_result():
  args = ["--model=unet", "--num_classes=3", "--in_channels=1", "--patch=64",
          "--model_args={\"depth\": 2, \"width\": 4}"]
  a = run(bonejax_cmd() + ["summary", *args])
  b = run([sys.executable, str(REPO / "launch/model_summary.py"), *args])
  assert a.returncode == 0 and b.returncode == 0, a.stderr[-1500:] + b.stderr[-1500:]
  ja, jb = (json.loads(x.stdout.strip().splitlines()[-1]) for x in (a, b))
  assert ja["params"] == jb["params"] > 0 and ja["gflops_per_patch"] == jb["gflops_per_patch"]
  bad = run(bonejax_cmd() + ["summary", "--model=resnet9000"])
  assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
  assert "resnet9000" in bad.stderr


def test_predict_help_groups_everyday_flags_before_multi_host_and_expert_ones():
  r = run(bonejax_cmd() + ["predict", "--help"])
  out = r.stdout
  heads = [out.index(h) for h in ("\nflags:", "several processes (multi-host) flags:",
                                  "expert flags:")]
  assert r.returncode == 0 and heads == sorted(heads)
  everyday, multihost, expert = (out[a:b] for a, b in zip(heads, heads[1:] + [len(out)]))
  assert "--model:" in everyday and "--output:" in everyday and "--tile_size" not in everyday
  assert "--coordinator_address:" in multihost and "--process_id:" in multihost
  assert "--tile_size:" in expert and "--inference_graph:" in expert
