"""The device-resident sampler against the host path: bit-identical batches (every axis, mirror
padding, rare-class records, mixed dtypes, every normalisation, 2.5D context planes),
replicated and sharded over 1 and 4 devices and over 2 processes (and the 3D sampler over 2
processes); resume; int32-safe indices
past 2^31 voxels; placement.

Run as `python tests/test_device_sampler.py worker ...` it is one process of the 2-process test.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
NAMES = ["s0", "s1", "s2"]
# s1 is smaller than the 16-px patch along every axis: its crops are mirrored.
SHAPES = {"s0": (20, 40, 36), "s1": (7, 9, 11), "s2": (12, 24, 30)}
PATCH, BATCH = 16, 8


def _write(root, dtypes, sparse=False):
  from bonejax.data import store
  rng = np.random.default_rng(0)
  for name, dtype in zip(NAMES, dtypes):
    shape = SHAPES[name]
    if dtype == "float32":
      img = rng.normal(3.0, 2.0, shape).astype(np.float32)
    else:
      img = rng.integers(0, np.iinfo(dtype).max, shape, endpoint=True).astype(dtype)
    lab = (rng.random(shape) > 0.6).astype(np.uint8)
    lab[2:4, 3:6, 4:7] = 2  # the rare class
    if sparse:  # sparse labels: every 3rd plane of each axis, the rest the unlabelled 255
      z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
      lab[(z % 3 != 1) & (y % 3 != 1) & (x % 3 != 1)] = store.UNLABELLED
    store.write_scan(root / name, img, lab, chunks=(8, 16, 16))
  store.write_dataset_json(root, ["background", "bone", "pore"], NAMES,
                           store.UNLABELLED if sparse else None)
  return root


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
  base = tmp_path_factory.mktemp("sampler")
  return {"uint": _write(base / "uint", ["uint16", "uint8", "uint16"]),
          "float": _write(base / "float", ["float32", "uint16", "uint8"]),
          "sparse": _write(base / "sparse", ["uint16", "uint8", "uint16"], sparse=True)}


def _stream(root, **kw):
  from bonejax.data import patches
  args = dict(patch_size=PATCH, global_batch_size=BATCH, process_index=0, process_count=1,
              num_threads=2, patches_per_plane=1, oversample_rare=0.3, seed=5)
  args.update(kw)
  return patches.PatchStream(root, NAMES, **args)


def _sampler(root, devices, placement, **kw):
  from bonejax.data import device_sampler
  from bonejax.train import mesh as mesh_lib
  mesh = mesh_lib.make_mesh(devices)
  stream = _stream(root, **kw)
  shapes, dtypes = [s.shape for s in stream.scans], [s.scan.dtype for s in stream.scans]
  big = device_sampler.plan(shapes, dtypes, mesh, 1 << 40)
  layout = device_sampler.plan(shapes, dtypes, mesh, big.bytes_per_device(placement))
  assert layout.placement == placement, layout.describe()
  return device_sampler.DeviceSampler(stream, mesh, layout), mesh


def _assert_same(host, dev, mesh):
  from bonejax.train import mesh as mesh_lib
  for k in ("image", "label"):
    assert dev[k].sharding == mesh_lib.data_sharding(mesh) and dev[k].dtype == host[k].dtype
    np.testing.assert_array_equal(np.asarray(dev[k]), host[k])  # bitwise


@pytest.mark.parametrize("data, rule, ndev, placement, context, margin", [
    ("uint", "percentile", 1, "replicated", 0, 0.5),
    ("uint", "percentile", 4, "replicated", 0, 1.0),
    ("uint", "percentile", 4, "sharded", 0, 0.5),     # packed integer reduce-scatter
    ("float", "zscore", 4, "sharded", 0, 0.5),        # float32 reduce-scatter
    ("float", "zscore", 1, "replicated", 0, 0.0),
    # 2.5D: 2k + 1 context planes as channels (s1 has 7 planes along Z: k = 4 mirrors twice).
    ("uint", "zscore_nonzero", 1, "replicated", 4, 0.5),
    ("uint", "percentile", 4, "sharded", 2, 0.5),     # channels + label, one int32 reduce-scatter
    ("float", "zscore", 4, "sharded", 1, 0.5),        # ... float32
    # Sparse labels: records over labelled cells, the unlabelled 255 carried as it is.
    ("sparse", "percentile", 4, "sharded", 0, 0.5),
    ("sparse", "percentile", 1, "replicated", 1, 0.5),
])
def test_batches_equal_the_host_path(datasets, data, rule, ndev, placement, context, margin):
  import jax
  # margin: config.edge_margin (0: crops inside the plane, 1: a whole patch past each border).
  sampler, mesh = _sampler(datasets[data], jax.devices()[:ndev], placement, normalization=rule,
                           context_slices=context, edge_margin=margin)
  host = _stream(datasets[data], normalization=rule, context_slices=context, edge_margin=margin)
  start = host.records_per_epoch - BATCH - 3  # the third batch straddles an epoch boundary
  host.set_state({"position": start})
  sampler.set_state({"position": start})
  rows = host.records(np.arange(start, start + 3 * BATCH))
  assert set(rows[:, 1]) == {0, 1, 2} and 1 in rows[:, 0]  # every axis; the mirrored scan
  assert (host._shuffled(np.arange(start, start + 3 * BATCH)) >= host.uniform_records).any()
  with sampler, host:
    for _ in range(3):
      with jax.transfer_guard("disallow"):  # no implicit transfer: only the records move
        dev = next(sampler)
      want = next(host)
      _assert_same(want, dev, mesh)
      if data == "sparse":
        assert (want["label"] == 255).any() and all((lab != 255).any() for lab in want["label"])
    assert sampler.get_state() == host.get_state()


def test_resume_equals_uninterrupted(datasets):
  import jax
  root = datasets["uint"]
  a, _ = _sampler(root, jax.devices()[:4], "replicated")
  ref = [np.asarray(next(a)["image"]) for _ in range(4)]
  state = a.get_state()
  b, _ = _sampler(root, jax.devices()[:4], "replicated")
  next(b), next(b)
  c, _ = _sampler(root, jax.devices()[:4], "sharded")
  c.set_state(b.get_state())  # another process, another placement: one integer carries over
  np.testing.assert_array_equal(np.asarray(next(c)["image"]), ref[2])
  np.testing.assert_array_equal(np.asarray(next(c)["image"]), ref[3])
  assert c.get_state() == state
  for s in (a, b, c):
    s.close()


def test_indices_past_int32():
  # A 3-scan layout of 2^33+ voxels, never allocated: (row, column) of every crop pixel against
  # the int64 flat offset, near the far corners too.
  import jax.numpy as jnp
  from bonejax.data import device_sampler as ds
  shapes = np.array([(2000, 1500, 1700), (65535, 3, 5), (900, 2100, 2300)], np.int64)
  sizes = np.prod(shapes, 1)
  start = np.concatenate([[0], np.cumsum(-(-sizes // ds.ROW))[:-1]])
  strides = np.stack([shapes[:, 1] * shapes[:, 2], shapes[:, 2], np.ones(3, np.int64)], 1)
  t = {"shape": shapes.astype(np.int32), "stride_q": (strides // ds.ROW).astype(np.int32),
       "stride_r": (strides % ds.ROW).astype(np.int32), "start_row": start.astype(np.int32)}
  rows = np.array([[0, 0, 1999, 1480, 1690], [2, 2, 2299, 890, 2090], [2, 1, 2099, -3, 2290],
                   [1, 1, 2, 65530, -2], [1, 0, 65534, 0, 0], [2, 0, 899, 2090, 2290]], np.int32)
  p, k = 12, 2  # 2.5D: 5 context planes, mirrored at the scans' ends (planes 0, 1999, 65534)
  q, r = (np.asarray(v) for v in ds._buffer_index({k: jnp.asarray(v) for k, v in t.items()},
                                                   jnp.asarray(rows), p, k))
  assert q.shape == r.shape == (len(rows), p, p, 2 * k + 1)
  for n, (s, axis, plane, oy, ox) in enumerate(rows):
    dims = [d for d in range(3) if d != axis]
    i = ds.patches.reflect_index(np.arange(oy, oy + p), shapes[s][dims[0]])
    j = ds.patches.reflect_index(np.arange(ox, ox + p), shapes[s][dims[1]])
    for c, pl in enumerate(ds.patches.reflect_index(np.arange(plane - k, plane + k + 1),
                                                    shapes[s][axis])):
      flat = (start[s] * ds.ROW + pl * strides[s][axis] + i[:, None] * strides[s][dims[0]] +
              j[None, :] * strides[s][dims[1]])
      np.testing.assert_array_equal(q[n, ..., c], flat // ds.ROW)
      np.testing.assert_array_equal(r[n, ..., c], flat % ds.ROW)
  assert (start[2] + sizes[2] // ds.ROW) * ds.ROW > 2**33


def test_plan():
  import jax
  from bonejax.data import device_sampler as ds
  from bonejax.train import mesh as mesh_lib
  mesh = mesh_lib.make_mesh(jax.devices()[:4])
  shapes = [(64, 512, 512), (10, 10, 10)]
  dtypes = ["uint16", "uint8"]
  full = ds.plan(shapes, dtypes, mesh, 1 << 40)
  assert full.placement == "replicated" and full.image_dtype == "uint16"
  assert full.rows == 4 * -(-(512 + 1) // 4) and full.start_rows == (0, 512)
  assert full.total_bytes == full.rows * ds.ROW * 3
  assert ds.plan(shapes, dtypes, mesh, full.total_bytes // 4).placement == "sharded"
  small = ds.plan(shapes, dtypes, mesh, full.total_bytes // 4 - 1)
  assert not small.fits and "over the budget" in small.describe()
  assert ds.plan(shapes, ["float32", "uint8"], mesh, 1 << 40).image_dtype == "float32"
  assert "cannot hold a scan side" in ds.plan([(4, 4, 70000)], ["uint8"], mesh, 1 << 40).reason
  assert "cannot hold images of dtype int16" in ds.plan([(4, 4, 4)], ["int16"], mesh,
                                                          1 << 40).describe()
  one = ds.plan(shapes, dtypes, mesh_lib.make_mesh(jax.devices()[:1]), full.total_bytes // 4)
  assert not one.fits and "sharded" not in one.describe()  # one device: nothing to shard over


def test_out_of_memory_while_loading(datasets, monkeypatch, capsys):
  # The budget is an estimate: running out of memory anyway is the same as not fitting.
  import jax
  from bonejax.core import errors
  from bonejax.data import device_sampler, feed
  from bonejax.train import mesh as mesh_lib

  def oom(*a, **k):
    raise MemoryError("Unable to allocate 12.0 GiB")
  monkeypatch.setattr(device_sampler.DeviceSampler, "__init__", oom)
  mesh = mesh_lib.make_mesh(jax.devices()[:4])
  put = lambda b: mesh_lib.put_batch(b, mesh_lib.data_sharding(mesh), BATCH)  # noqa: E731
  with pytest.raises(errors.UserError, match=r"sampler=device: .*, replicated .* ran out of memory "
                     r"\(Unable to allocate 12.0 GiB\); set sampler=host"):
    feed.make_feed("device", _stream(datasets["uint"]), mesh, put)
  capsys.readouterr()
  f = feed.make_feed("auto", _stream(datasets["uint"]), mesh, put)
  err = capsys.readouterr().err.splitlines()
  assert f.kind == "host" and len(err) == 1 and err[0].startswith("warning: sampler=auto: ")
  assert next(f)["image"].shape == (BATCH, PATCH, PATCH, 1)
  f.close()


# ---------------------------------------------------------------------------------------------
# Two processes (jax.distributed over gloo), 2 CPU devices each.
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one(datasets):
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2",
             JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", PYTHONPATH=str(REPO))
  procs = [subprocess.Popen([sys.executable, __file__, "worker", str(datasets["uint"]),
                             f"127.0.0.1:{port}", str(i)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
    said = [line for line in out.splitlines() if line.endswith(" ok")]  # (gloo logs too)
    assert said == ["replicated ok", "sharded ok", "3d ok"], out


def _worker(root: str, coordinator: str, pid: int) -> None:
  import jax
  from jax.experimental import multihost_utils
  jax.distributed.initialize(coordinator, num_processes=2, process_id=pid)
  assert jax.device_count() == 4 and jax.local_device_count() == 2
  for placement in ("replicated", "sharded"):
    sampler, mesh = _sampler(Path(root), jax.devices(), placement, process_index=pid,
                             process_count=2)
    whole = _stream(Path(root))                                # one host's global batches
    mine = _stream(Path(root), process_index=pid, process_count=2)  # this host's rows of them
    with sampler, whole, mine:
      for _ in range(3):
        dev = next(sampler)
        gathered = multihost_utils.process_allgather(dev, tiled=True)
        want, own = next(whole), next(mine)
        for k in ("image", "label"):
          np.testing.assert_array_equal(gathered[k], want[k])
          local = np.concatenate([np.asarray(s.data) for s in sorted(
              dev[k].addressable_shards, key=lambda s: s.index[0].start)])
          np.testing.assert_array_equal(local, own[k])
    print(placement, "ok", flush=True)
  _worker_3d(root, pid)


def _worker_3d(root: str, pid: int) -> None:
  """The 3D device sampler over the 2 x 2 devices: the global batch is one host's stream's,
  and this process's rows are its own stream's (what put_batch of the host path gives)."""
  import jax
  from jax.experimental import multihost_utils
  from bonejax.data import device_sampler3d, patches3d
  from bonejax.train import mesh as mesh_lib
  kw = dict(patch_size=(4, 8, 6), global_batch_size=BATCH, patches_per_scan=3, seed=5,
            num_threads=2, prefetch=0)
  mesh = mesh_lib.make_mesh(jax.devices())
  # s0 and s2 only: s1 is smaller than the patch (3D patches are not mirrored).
  stream = lambda i, n: patches3d.PatchStream3d(root, ["s0", "s2"], process_index=i,  # noqa
                                                process_count=n, **kw)
  with device_sampler3d.DeviceSampler3d(stream(pid, 2), mesh) as sampler, \
      stream(0, 1) as whole, stream(pid, 2) as mine:
    for _ in range(3):
      dev = next(sampler)
      gathered = multihost_utils.process_allgather(dev, tiled=True)
      want, own = next(whole), next(mine)
      for k in ("image", "label"):
        assert dev[k].sharding == mesh_lib.data_sharding(mesh)
        np.testing.assert_array_equal(gathered[k], want[k])
        local = np.concatenate([np.asarray(s.data) for s in sorted(
            dev[k].addressable_shards, key=lambda s: s.index[0].start)])
        np.testing.assert_array_equal(local, own[k])
  print("3d ok", flush=True)


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "worker":
  sys.path.insert(0, str(REPO))
  _worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
