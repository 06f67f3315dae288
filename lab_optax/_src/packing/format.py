"""The packed file: one ``.npz`` with every leaf, the tree's skeleton and a checksum."""

import hashlib
import importlib
import json
import math
import os
import sys
import uuid
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lab_optax._src.packing.leaves import (
  PackedBinary,
  PackedQuantized,
  is_packed,
)

_FORMAT = "lab_optax.packed"
# Version 2 adds ternary and m-bit leaves (PackedQuantized) and the bits per weight;
# version 1 files (binary only) are read as before.
_VERSION = 2
_READABLE = (1, 2)
_META_KEY = "__meta__"
# The packed leaves in the file's structure: kind, array fields, static fields.
_PACKED_KINDS = {
  PackedBinary: ("packed", ("bits", "alpha"), ("shape", "dtype")),
  PackedQuantized: (
    "quantized",
    ("planes", "scale"),
    ("shape", "dtype", "levels", "divisor", "num_scales"),
  ),
}


def _plain(value: Any) -> Any:
  return list(value) if isinstance(value, tuple) else value


def _typed(name: str, value: Any) -> Any:
  """A static field as the packed leaf holds it: tuples of ints or floats, ints, names."""
  if name == "shape":
    return tuple(int(v) for v in value)
  if name == "levels":
    return tuple(float(v) for v in value)
  return value if name == "dtype" else int(value)


class _Unencodable(Exception):
  pass


def _encode_value(v: Any) -> Any:
  """Typed JSON for small metadata values (so tuples come back as tuples)."""
  if v is None or isinstance(v, (bool, str)):
    return {"v": v}
  if isinstance(v, (int, float)):
    return {"int" if isinstance(v, int) else "float": v}
  if isinstance(v, (tuple, list)):
    return {type(v).__name__: [_encode_value(e) for e in v]}
  if isinstance(v, dict) and all(isinstance(key, str) for key in v):
    return {"dict": [[key, _encode_value(e)] for key, e in v.items()]}
  raise _Unencodable(repr(v))


def _decode_value(e: dict[str, Any]) -> Any:
  ((tag, v),) = e.items()
  if tag in ("v", "int", "float"):
    return v
  if tag == "tuple":
    return tuple(_decode_value(x) for x in v)
  if tag == "list":
    return [_decode_value(x) for x in v]
  if tag == "dict":
    return {key: _decode_value(x) for key, x in v}
  raise ValueError(f"unknown metadata tag {tag!r}")


def _type_name(cls: type) -> str:
  return f"{cls.__module__}:{cls.__qualname__}"


def _nnx():
  # A tree can only hold nnx objects once flax.nnx is imported; never import it here.
  if "flax.nnx" not in sys.modules:
    return None
  return sys.modules["flax.nnx"]


def _resolve_variable_type(name: str) -> type | None:
  """A Variable class from ``module:qualname``, without importing arbitrary code."""
  module_name, _, qualname = name.partition(":")
  if module_name.split(".")[0] in ("flax", "lab_optax"):
    try:
      importlib.import_module(module_name)
    except ImportError:
      return None
  module = sys.modules.get(module_name)
  if module is None:
    return None
  obj: Any = module
  for part in qualname.split("."):
    obj = getattr(obj, part, None)
  nnx = importlib.import_module("flax.nnx")
  if isinstance(obj, type) and issubclass(obj, nnx.Variable):
    return obj
  return None


def _dict_key(key: Any) -> Any:
  if isinstance(key, (str, int)) and not isinstance(key, bool):
    return key
  raise _Unencodable(repr(key))


def _leaf_array(x: Any, name: str) -> np.ndarray:
  dtype = getattr(x, "dtype", None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    raise ValueError(
      f"cannot save the leaf at {name}: it is a PRNG key (dtype {x.dtype}); save the model's "
      "parameters without its RNG state, e.g. nnx.state(model, nnx.Not(nnx.RngState))"
    )
  arr = np.asarray(x)
  if arr.dtype.kind not in "biufcV" or (arr.dtype.kind == "V" and arr.dtype.names):
    raise ValueError(f"cannot save the leaf at {name}: dtype {arr.dtype} is not numeric")
  return arr


def _stored(arr: np.ndarray) -> np.ndarray:
  """The array as written: dtypes that .npy cannot name (bfloat16, ...) as raw uints."""
  if np.dtype(arr.dtype.str) == arr.dtype:
    return arr
  return arr.view(np.dtype(f"u{arr.dtype.itemsize}"))


class _Encoder:
  """Walks a pytree in flatten order, recording its leaves and a skeleton."""

  def __init__(self, paths: list[str]):
    self.paths = paths  # key paths of the leaves, in flatten order
    self.leaves: list[np.ndarray] = []

  def leaf(self, x: Any) -> int:
    index = len(self.leaves)
    self.leaves.append(_leaf_array(x, self.paths[index] or "<root>"))
    return index

  def encode(self, node: Any) -> dict[str, Any]:
    if node is None:
      return {"kind": "none"}
    if jax.tree_util.all_leaves([node]):
      return {"kind": "leaf", "index": self.leaf(node)}
    # Children in flatten order, so leaf i is the i-th of tree_flatten_with_path.
    children, aux = jax.tree_util.flatten_one_level(node)
    if is_packed(node):
      kind, data_fields, meta_fields = _PACKED_KINDS[type(node)]
      fields = {name: self.leaf(c) for name, c in zip(data_fields, children)}
      meta = {name: _plain(getattr(node, name)) for name in meta_fields}
      return {"kind": kind, **meta, **fields}
    encoded = [self.encode(c) for c in children]
    nnx = _nnx()
    try:
      if type(node) in (list, tuple):
        return {"kind": type(node).__name__, "children": encoded}
      if type(node) is dict or (nnx is not None and type(node) is nnx.State):
        keys = [_dict_key(key) for key in aux]  # the sorted keys
        kind = "dict" if type(node) is dict else "state"
        return {"kind": kind, "keys": keys, "children": encoded}
      if nnx is not None and isinstance(node, nnx.Variable):
        metadata = _encode_value(dict(node.get_metadata()))
        return {
          "kind": "variable",
          "type": _type_name(type(node)),
          "metadata": metadata,
          "value": encoded[0],
        }
    except _Unencodable:
      pass
    return {"kind": "other", "type": _type_name(type(node)), "children": encoded}


class _Decoder:
  def __init__(self, leaves: list[jax.Array], path: str):
    self.leaves = leaves
    self.file = path

  def need_like(self, what: str, where: str) -> ValueError:
    return ValueError(
      f"{self.file}: holds {what} at {where or '<root>'}, which load_packed cannot rebuild on "
      "its own; pass like=template (a pytree of the same structure) to restore it"
    )

  def decode(self, e: dict[str, Any], path: str = "") -> Any:
    kind = e["kind"]
    if kind == "none":
      return None
    if kind == "leaf":
      return self.leaves[e["index"]]
    for cls, (name, data_fields, meta_fields) in _PACKED_KINDS.items():
      if kind == name:
        fields = {f: self.leaves[e[f]] for f in data_fields}
        meta = {f: _typed(f, e[f]) for f in meta_fields}
        return cls(**fields, **meta)
    if kind in ("list", "tuple"):
      items = [self.decode(c, f"{path}[{i}]") for i, c in enumerate(e["children"])]
      return items if kind == "list" else tuple(items)
    if kind in ("dict", "state"):
      mapping = {
        key: self.decode(c, f"{path}[{key!r}]") for key, c in zip(e["keys"], e["children"])
      }
      if kind == "dict":
        return mapping
      return importlib.import_module("flax.nnx").State(mapping)
    if kind == "variable":
      cls = _resolve_variable_type(e["type"])
      if cls is None:
        raise self.need_like(f"a Variable of type {e['type']} that is not imported", path)
      return cls.from_metadata(
        self.decode(e["value"], f"{path}.value"), _decode_value(e["metadata"])
      )
    raise self.need_like(f"a node of type {e.get('type', kind)}", path)


def _checksum(header: dict[str, Any], arrays: list[np.ndarray]) -> str:
  h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
  for a in arrays:
    h.update(np.ascontiguousarray(a).data)
  return h.hexdigest()


def _packed_leaves(tree: Any) -> list[tuple[Any, Any]]:
  leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_packed)
  return [(p, x) for p, x in leaves if is_packed(x)]


def _packed_entry(path: Any, x: Any) -> dict[str, Any]:
  kind = "binary" if isinstance(x, PackedBinary) else "quantized"
  return {
    "path": jax.tree_util.keystr(path),
    "shape": list(x.shape),
    "dtype": x.dtype,
    "kind": kind,
    "bits": x.bits_per_weight,
  }


def _describe(entry: dict[str, Any] | None) -> str:
  if entry is None:
    return "no packed leaf"
  name = "a PackedBinary" if entry.get("kind", "binary") == "binary" else "a PackedQuantized"
  bits = entry.get("bits", 1)
  return f"{name} {entry['dtype']}{tuple(entry['shape'])} of {bits} bit{'s' if bits > 1 else ''}"


def save_packed(path: str | os.PathLike, packed: Any) -> None:
  """Writes a packed pytree to one ``.npz`` file, atomically, with a checksum.

  The file holds every leaf (the bits and scales of :class:`PackedBinary` and
  :class:`PackedQuantized` leaves, and the full-precision leaves) as
  ``leaf_<i>`` arrays in flatten order, and a JSON ``__meta__`` entry with the
  key path of each leaf, the tree's structure, each packed leaf's shape,
  dtype, kind and bits per weight (``"packed"``; for ternary and m-bit leaves
  the level set in the structure), the mean bits per packed weight
  (``"bits_per_weight"``), and a sha256 over all of it. Dtypes
  that ``.npy`` cannot name (bfloat16, float8) are stored as raw unsigned
  integers and restored from the recorded name. The file is written to a
  temporary name in the same directory and renamed over ``path``, so a crash
  never leaves a half-written file under ``path``.

  The structure is stored as a skeleton that :func:`load_packed` rebuilds
  without the original code for: ``dict`` and ``nnx.State`` with ``str`` or
  ``int`` keys, ``list``, ``tuple``, ``None`` and ``nnx.Variable`` subclasses
  (``nnx.Param``, ...) whose metadata are plain values (numbers, strings,
  tuples, lists, dicts). Other nodes (namedtuples, dataclasses, optax states,
  custom pytrees) are saved too, but loading them needs ``like=``.

  Args:
    path: the file to write; used as given (no ``.npz`` suffix is appended).
    packed: a pytree of arrays, :class:`PackedBinary` and
      :class:`PackedQuantized` (e.g. from :func:`pack`); plain params work
      too.

  Raises:
    ValueError: if a leaf is not a numeric array (its path is named).

  Examples:
    >>> import os, tempfile, jax.numpy as jnp
    >>> import lab_optax
    >>> packed = lab_optax.pack({"w": jnp.array([[0.5, -0.5], [0.5, 0.5]]), "b": jnp.zeros(2)})
    >>> path = os.path.join(tempfile.mkdtemp(), "model.npz")
    >>> lab_optax.save_packed(path, packed)
    >>> restored = lab_optax.load_packed(path)
    >>> restored["w"].shape, bool((restored["w"].bits == packed["w"].bits).all())
    ((2, 2), True)
  """
  path = os.fspath(path)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(packed)[0]]
  encoder = _Encoder(paths)
  structure = encoder.encode(packed)
  packed_meta = [_packed_entry(p, x) for p, x in _packed_leaves(packed)]
  weights = sum(math.prod(e["shape"]) for e in packed_meta)
  stored_bits = sum(math.prod(e["shape"]) * e["bits"] for e in packed_meta)
  stored = [_stored(a) for a in encoder.leaves]
  header = {
    "format": _FORMAT,
    "version": _VERSION,
    "structure": structure,
    "paths": paths,
    "leaves": [{"shape": list(a.shape), "dtype": a.dtype.name} for a in encoder.leaves],
    "packed": packed_meta,
    "bits_per_weight": stored_bits / weights if weights else None,
  }
  meta = dict(header, sha256=_checksum(header, stored))
  entries = {f"leaf_{i}": a for i, a in enumerate(stored)}
  entries[_META_KEY] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
  tmp = os.path.join(
    os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp"
  )
  try:
    with open(tmp, "xb") as f:
      np.savez(f, **entries)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


class _BadFile(ValueError):
  pass


def _read(path: str) -> tuple[dict[str, Any], list[np.ndarray]]:
  try:
    with np.load(path, allow_pickle=False) as npz:
      if _META_KEY not in npz.files:
        raise _BadFile(f"{path}: not a lab_optax packed file (no {_META_KEY} entry)")
      meta = json.loads(npz[_META_KEY].tobytes().decode())
      found = meta.get("format") if isinstance(meta, dict) else None
      if found != _FORMAT:
        raise _BadFile(f"{path}: not a lab_optax packed file (format {found!r})")
      if meta.get("version") not in _READABLE:
        raise _BadFile(
          f"{path}: format version {meta.get('version')!r} is not supported (this lab_optax "
          f"reads versions {', '.join(map(str, _READABLE))})"
        )
      count = len(meta["leaves"])
      missing = [f"leaf_{i}" for i in range(count) if f"leaf_{i}" not in npz.files]
      if missing:
        raise _BadFile(f"{path}: the file is incomplete: entry {missing[0]} is missing")
      arrays = [npz[f"leaf_{i}"] for i in range(count)]
  except (_BadFile, FileNotFoundError, IsADirectoryError, PermissionError):
    raise
  except Exception as e:  # zipfile, zlib and json errors of a damaged file
    raise ValueError(
      f"{path}: cannot read the file, it is truncated or corrupted ({type(e).__name__}: {e})"
    ) from e
  return meta, arrays


def _restore(path: str, meta: dict[str, Any], arrays: list[np.ndarray]) -> list[jax.Array]:
  header = {key: v for key, v in meta.items() if key != "sha256"}
  digest = _checksum(header, arrays)
  if digest != meta.get("sha256"):
    raise ValueError(
      f"{path}: checksum mismatch (sha256 {digest[:16]}... but the file records "
      f"{str(meta.get('sha256'))[:16]}...): the file is corrupted"
    )
  leaves = []
  for i, (a, spec) in enumerate(zip(arrays, meta["leaves"])):
    dtype = jnp.dtype(spec["dtype"])
    a = a.view(dtype) if a.dtype != dtype else a
    if list(a.shape) != spec["shape"]:
      raise ValueError(f"{path}: leaf {meta['paths'][i]} has shape {a.shape}, not {spec['shape']}")
    leaves.append(jnp.asarray(a))
  return leaves


def _leaf_spec(x: Any) -> tuple[list[int], str]:
  dtype = x.dtype if hasattr(x, "dtype") else np.result_type(x)
  return list(np.shape(x)), jnp.dtype(dtype).name


def _check_like(path: str, meta: dict[str, Any], like: Any) -> Any:
  flat, treedef = jax.tree_util.tree_flatten_with_path(like)
  t_paths = [jax.tree_util.keystr(p) for p, _ in flat]
  f_paths = meta["paths"]
  for i, (f, t) in enumerate(zip(f_paths, t_paths)):
    if f != t:
      raise ValueError(
        f"{path}: does not match the template: leaf {i} is at {f or '<root>'} in the file "
        f"but at {t or '<root>'} in the template"
      )
  if len(f_paths) != len(t_paths):
    longer, which = (f_paths, "file") if len(f_paths) > len(t_paths) else (t_paths, "template")
    raise ValueError(
      f"{path}: does not match the template: only the {which} has a leaf at "
      f"{longer[min(len(f_paths), len(t_paths))] or '<root>'}"
    )
  for p, spec, (_, x) in zip(f_paths, meta["leaves"], flat):
    shape, dtype = _leaf_spec(x)
    if [spec["shape"], spec["dtype"]] != [shape, dtype]:
      raise ValueError(
        f"{path}: does not match the template at {p or '<root>'}: the file has "
        f"{spec['dtype']}{tuple(spec['shape'])}, the template {dtype}{tuple(shape)}"
      )
  t_packed = {e["path"]: e for e in (_packed_entry(p, x) for p, x in _packed_leaves(like))}
  f_packed = {e["path"]: {"kind": "binary", "bits": 1, **e} for e in meta["packed"]}
  for p in sorted(set(t_packed) | set(f_packed)):
    if t_packed.get(p) != f_packed.get(p):
      raise ValueError(
        f"{path}: does not match the template at {p or '<root>'}: the file has "
        f"{_describe(f_packed.get(p))}, the template {_describe(t_packed.get(p))}"
      )
  return treedef


def load_packed(path: str | os.PathLike, like: Any = None) -> Any:
  """Reads a file written by :func:`save_packed`, refusing damaged or mismatched files.

  The checksum is verified before anything is returned. Leaves come back as
  ``jax.Array`` (so under JAX's default 32-bit mode a saved float64 leaf
  becomes float32, as with :func:`jax.numpy.asarray`).

  Args:
    path: the file.
    like: optional template, a pytree with the structure that the file must
      hold, e.g. ``pack(params)`` of a freshly built model, or its
      :func:`jax.eval_shape`; leaves may be arrays or
      :class:`jax.ShapeDtypeStruct`. The file's key paths, leaf shapes and
      dtypes and packed shapes must match it, and the result takes the
      template's containers. Needed for nodes that the file cannot describe on
      its own (see :func:`save_packed`).

  Returns:
    The packed pytree, to use with :func:`unpack` or the inference helpers.

  Raises:
    ValueError: naming the file, if it is truncated or corrupted (unreadable
      archive, checksum mismatch, missing entries), is not a lab_optax packed
      file, holds nodes that need ``like``, or does not match ``like`` (naming
      the first mismatching path).

  Examples:
    >>> import os, tempfile, jax.numpy as jnp
    >>> import lab_optax
    >>> packed = lab_optax.pack({"w": jnp.array([[0.5, -0.5], [0.5, 0.5]])})
    >>> path = os.path.join(tempfile.mkdtemp(), "model.npz")
    >>> lab_optax.save_packed(path, packed)
    >>> lab_optax.load_packed(path, like=lab_optax.pack({"w": jnp.ones((2, 3))}))
    Traceback (most recent call last):
    ...
    ValueError: ...model.npz: does not match the template at ['w'].bits: the file has uint32(2, 1), the template uint32(3, 1)
  """
  path = os.fspath(path)
  meta, arrays = _read(path)
  try:
    leaves = _restore(path, meta, arrays)
    if like is not None:
      treedef = _check_like(path, meta, like)
      return jax.tree.unflatten(treedef, leaves)
    return _Decoder(leaves, path).decode(meta["structure"])
  except (KeyError, TypeError, IndexError) as e:
    raise ValueError(f"{path}: the metadata is malformed ({type(e).__name__}: {e})") from e
