"""A pickle interpreter for files from strangers: bounded in objects, bytes, nesting and time.

An allow-list `find_class` on Python's own unpickler keeps code out, not exhaustion: the C
unpickler runs each opcode to completion and hands back whatever graph the pickle drew. A 500-byte
pickle can nest shared references (a dict of ten references to one dict of ten references ...:
10^40 values once expanded, which any walk over the result or `json.dump` then expands), set
attributes on the allow-listed stand-ins themselves (BUILD), or fill a set with integers whose
hashes collide (hours inside one C call). Here the opcodes, as `pickletools.genops` decodes them
(decoding executes nothing), are run one at a time:

- every opcode, and every item an allow-listed call makes, counts against `Limits.nodes`; bytes
  made by calls against `Limits.made_bytes`; the clock is checked between opcodes;
- dict keys and set members are strings, bytes, booleans, None, floats or integers below
  2**61 (whose hashes are the integers themselves, so they cannot be made to collide);
- only `Call` stand-ins are called (REDUCE); BUILD is accepted on dicts only, and its state
  (torch's per-module `_metadata` on a state dict's OrderedDict) dropped;
- the result, with every shared reference expanded, must stay within `Limits.nodes` values and
  `Limits.depth` levels and must not contain itself: whatever walks it afterwards is bounded.

Opcodes that build class instances (INST, OBJ, NEWOBJ, extension registry, out-of-band buffers)
are refused: nothing a checkpoint of tensors and plain values needs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import pickle
import pickletools
import time
from typing import Any, Callable, Iterator

from bonejax.core import errors


class UnsafePickle(errors.UserError):
  """The pickle names or does something outside the allow-list."""


@dataclasses.dataclass(frozen=True)
class Limits:
  nodes: int = 2_000_000       # opcodes run + items made by calls; also the expanded result's size
  made_bytes: int = 64 << 20   # bytes and text made by calls (e.g. _codecs.encode of one memo)
  depth: int = 100             # nesting of the result
  seconds: float = 60.0


class Global:
  """A name the pickle may refer to (GLOBAL); made fresh for every load."""

  __slots__ = ("name",)

  def __init__(self, name: str):
    self.name = name

  def __repr__(self) -> str:
    return self.name


class Call(Global):
  """An allow-listed callable: the only kind of object REDUCE calls."""

  __slots__ = ("fn",)

  def __init__(self, name: str, fn: Callable[..., Any]):
    super().__init__(name)
    self.fn = fn


_HASH_SAFE = (str, bytes, bool, float, type(None))  # str and bytes hashes are salted per process


def check_key(key: Any) -> None:
  """Refuses a dict key or set member whose hashing could be slow or made to collide."""
  if isinstance(key, _HASH_SAFE):
    return
  if isinstance(key, int) and -(2**61) < key < 2**61 - 1:
    return
  raise UnsafePickle(f"the pickle uses a {_describe(key)} as a dict key or set member; "
                     "checkpoints use strings and numbers")


def _describe(obj: Any) -> str:
  if isinstance(obj, Global):
    return obj.name
  if isinstance(obj, int) and not isinstance(obj, bool):
    return f"{obj.bit_length()}-bit integer"
  return type(obj).__name__


def _children(obj: Any) -> Iterator[Any] | None:
  if isinstance(obj, dict):
    return itertools.chain.from_iterable(obj.items())
  if isinstance(obj, (list, tuple, set, frozenset)):
    return iter(obj)
  return None


def expanded_size(root: Any, limit: int, depth: int) -> int:
  """Values in `root` with every shared reference expanded, as a recursive walk or json sees it.

  Memoised by identity, so a shared object costs one visit: O(distinct objects). Raises
  UserError past `limit` values or `depth` levels, or for an object that contains itself.
  """
  if _children(root) is None:
    return 1
  sizes: dict[int, int] = {}  # id -> expanded size of a finished container (all alive in root)
  path = {id(root)}
  frames: list[list[Any]] = [[root, _children(root), 1]]
  end = object()
  while frames:
    frame = frames[-1]
    child = next(frame[1], end)
    if child is end:
      frames.pop()
      path.discard(id(frame[0]))
      sizes[id(frame[0])] = frame[2]
      if frames:
        frames[-1][2] += frame[2]
        frame = frames[-1]
      else:
        return frame[2]
    elif id(child) in sizes:
      frame[2] += sizes[id(child)]
    elif id(child) in path:
      raise errors.UserError(f"holds a {type(child).__name__} that contains itself")
    else:
      it = _children(child)
      if it is None:
        frame[2] += 1
      elif len(frames) >= depth:
        raise errors.UserError(f"nests values more than {depth} levels deep")
      else:
        path.add(id(child))
        frames.append([child, it, 1])
    if frame[2] > limit:
      raise errors.UserError(f"holds more than {limit:,} values once its shared references are "
                             "expanded (a crafted file?)")
  raise AssertionError("unreachable")


class _Stop(Exception):

  def __init__(self, value: Any):
    super().__init__()
    self.value = value


class Interpreter:
  """Runs one pickle. `find_class(module, name)` returns a `Global` (or a plain constant) or
  raises; `persistent_load(pid)` resolves persistent ids; `build(inst, state)` returns whether
  it accepts BUILD on something other than a dict (it may raise instead)."""

  def __init__(self, data: bytes, find_class: Callable[[str, str], Any],
               persistent_load: Callable[[Any], Any], limits: Limits = Limits(),
               build: Callable[[Any, Any], bool] = lambda inst, state: False):
    self.data, self.limits = data, limits
    self.find_class, self.persistent_load, self.build = find_class, persistent_load, build
    self.stack: list[Any] = []
    self.metastack: list[list[Any]] = []
    self.memo: dict[int, Any] = {}
    self.nodes = 0
    self.made_bytes = 0
    self.deadline = 0.0

  # -- budgets -----------------------------------------------------------------------------------

  def charge(self, nodes: int = 0, made_bytes: int = 0) -> None:
    self.nodes += nodes
    self.made_bytes += made_bytes
    if self.nodes > self.limits.nodes:
      raise errors.UserError(f"holds more than {self.limits.nodes:,} pickled values (a crafted "
                             "file?)")
    if self.made_bytes > self.limits.made_bytes:
      raise errors.UserError(f"its pickle makes more than {self.limits.made_bytes:,} bytes of text "
                             "from references to one value (a crafted file?)")

  @contextlib.contextmanager
  def untimed(self) -> Iterator[None]:
    """Time spent inside does not count: reading and copying tensors, bounded by the file's
    size, may take minutes for a large checkpoint on a slow disk."""
    start = time.monotonic()
    try:
      yield
    finally:
      self.deadline += time.monotonic() - start

  def _check_time(self) -> None:
    if time.monotonic() >= self.deadline:
      raise errors.UserError(f"took more than {self.limits.seconds:g} s to unpickle (a crafted "
                             "file?)")

  # -- running -----------------------------------------------------------------------------------

  def load(self) -> Any:
    self.deadline = time.monotonic() + self.limits.seconds
    self._check_time()
    ops = pickletools.genops(io.BytesIO(self.data))
    try:
      for op, arg, _ in ops:
        self.nodes += 1
        if self.nodes % 256 == 0:
          self._check_time()
          self.charge()
        handler = _DISPATCH.get(op.name)
        if handler is None:
          raise UnsafePickle(f"refusing to unpickle opcode {op.name}: bonejax reads checkpoints "
                             "of tensors, dicts, lists and plain values only")
        handler(self, arg)
    except _Stop as stop:
      value = stop.value
    else:
      raise errors.UserError("its pickle ends without a STOP opcode (truncated?)")
    self.charge()
    expanded_size(value, self.limits.nodes, self.limits.depth)
    return value

  def _pop_mark(self) -> list[Any]:
    items = self.stack
    self.stack = self.metastack.pop()
    return items

  def _push(self, value: Any) -> None:
    self.stack.append(value)

  # -- opcodes -----------------------------------------------------------------------------------

  def _proto(self, arg):
    if not 0 <= arg <= pickle.HIGHEST_PROTOCOL:
      raise errors.UserError(f"unsupported pickle protocol {arg}")

  def _stop(self, _):
    raise _Stop(self.stack.pop())

  def _mark(self, _):
    self.metastack.append(self.stack)
    self.stack = []

  def _pop(self, _):
    if self.stack:
      self.stack.pop()
    else:
      self._pop_mark()

  def _int(self, arg):
    if not isinstance(arg, bool) and abs(arg).bit_length() > 2048:
      raise errors.UserError(f"holds a {arg.bit_length()}-bit integer")
    self._push(arg)

  def _reduce(self, _):
    args = self.stack.pop()
    func = self.stack[-1]
    if not isinstance(args, tuple):
      raise errors.UserError(f"corrupt pickle: REDUCE with {_describe(args)} arguments")
    if isinstance(func, Call):
      self.stack[-1] = func.fn(*args)
    elif isinstance(func, Global):
      raise UnsafePickle(f"the pickle calls {func.name}, which a checkpoint never does")
    else:
      raise UnsafePickle(f"the pickle calls a {_describe(func)}")

  def _build(self, _):
    state = self.stack.pop()
    inst = self.stack[-1]
    # torch keeps per-module versions as `_metadata` on a state dict's OrderedDict: not needed.
    if not isinstance(inst, dict) and not self.build(inst, state):
      raise UnsafePickle(f"the pickle sets attributes of a {_describe(inst)}; a checkpoint only "
                         "does so on an OrderedDict")
    del state

  def _persistent(self, _):
    self._push(self.persistent_load(self.stack.pop()))

  def _global(self, arg):
    module, name = arg.split(" ", 1)
    self._push(self.find_class(module, name))

  def _stack_global(self, _):
    name = self.stack.pop()
    module = self.stack.pop()
    if not (isinstance(module, str) and isinstance(name, str)):
      raise errors.UserError("corrupt pickle: STACK_GLOBAL without two names")
    self._push(self.find_class(module, name))

  def _appends(self, items):
    target = self.stack[-1]
    if not isinstance(target, list):
      raise UnsafePickle(f"the pickle appends to a {_describe(target)}")
    target.extend(items)

  def _setitems(self, items):
    target = self.stack[-1]
    if not isinstance(target, dict):
      raise UnsafePickle(f"the pickle sets items of a {_describe(target)}")
    if len(items) % 2:
      raise errors.UserError("corrupt pickle: an odd number of items for a dict")
    for i in range(0, len(items), 2):
      check_key(items[i])
      target[items[i]] = items[i + 1]

  def _setitem(self, _):
    value = self.stack.pop()
    key = self.stack.pop()
    self._setitems([key, value])

  def _additems(self, items):
    target = self.stack[-1]
    if not isinstance(target, set):
      raise UnsafePickle(f"the pickle adds items to a {_describe(target)}")
    for item in items:
      check_key(item)
      target.add(item)

  def _frozenset(self, items):
    for item in items:
      check_key(item)
    return frozenset(items)

  def _dict(self, items):
    d: dict[Any, Any] = {}
    self._push(d)
    self._setitems(items)

  def _put(self, arg):
    if arg < 0:
      raise errors.UserError("corrupt pickle: negative memo index")
    self.memo[arg] = self.stack[-1]

  def _get(self, arg):
    try:
      self._push(self.memo[arg])
    except KeyError:
      raise errors.UserError(f"corrupt pickle: memo entry {arg} is read before it is written") \
          from None


def _value(op: Interpreter, arg: Any) -> None:
  op._push(arg)  # pylint: disable=protected-access


def _const(value: Any) -> Callable[[Interpreter, Any], None]:
  return lambda op, _: op._push(value)  # pylint: disable=protected-access


def _from_top(n: int) -> Callable[[Interpreter, Any], None]:
  def run(op: Interpreter, _):
    # pylint: disable=protected-access
    items = tuple(op.stack[-n:]) if n else ()
    if len(items) != n:
      raise IndexError("stack underflow")
    del op.stack[len(op.stack) - n:]
    op._push(items)
  return run


# pylint: disable=protected-access
_DISPATCH: dict[str, Callable[[Interpreter, Any], None]] = {
    "PROTO": Interpreter._proto,
    "FRAME": lambda op, _: None,
    "STOP": Interpreter._stop,
    "MARK": Interpreter._mark,
    "POP": Interpreter._pop,
    "POP_MARK": lambda op, _: op._pop_mark(),
    "DUP": lambda op, _: op._push(op.stack[-1]),
    **dict.fromkeys(("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"),
                    Interpreter._int),
    **dict.fromkeys(("STRING", "BINSTRING", "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES",
                     "BINBYTES8", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8",
                     "FLOAT", "BINFLOAT"), _value),
    "NONE": _const(None),
    "NEWTRUE": _const(True),
    "NEWFALSE": _const(False),
    "EMPTY_LIST": lambda op, _: op._push([]),
    "EMPTY_DICT": lambda op, _: op._push({}),
    "EMPTY_SET": lambda op, _: op._push(set()),
    "EMPTY_TUPLE": _const(()),
    "LIST": lambda op, _: op._push(op._pop_mark()),
    "TUPLE": lambda op, _: op._push(tuple(op._pop_mark())),
    "TUPLE1": _from_top(1),
    "TUPLE2": _from_top(2),
    "TUPLE3": _from_top(3),
    "DICT": lambda op, _: op._dict(op._pop_mark()),
    "FROZENSET": lambda op, _: op._push(op._frozenset(op._pop_mark())),
    "APPEND": lambda op, _: op._appends([op.stack.pop()]),
    "APPENDS": lambda op, _: op._appends(op._pop_mark()),
    "SETITEM": Interpreter._setitem,
    "SETITEMS": lambda op, _: op._setitems(op._pop_mark()),
    "ADDITEMS": lambda op, _: op._additems(op._pop_mark()),
    **dict.fromkeys(("GET", "BINGET", "LONG_BINGET"), Interpreter._get),
    **dict.fromkeys(("PUT", "BINPUT", "LONG_BINPUT"), Interpreter._put),
    "MEMOIZE": lambda op, _: op._put(len(op.memo)),
    "GLOBAL": Interpreter._global,
    "STACK_GLOBAL": Interpreter._stack_global,
    "REDUCE": Interpreter._reduce,
    "BUILD": Interpreter._build,
    "BINPERSID": Interpreter._persistent,
}
# pylint: enable=protected-access
