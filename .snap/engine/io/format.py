"""The native circuit file: one zip archive holding `circuit.json` and `arrays.safetensors`.

`circuit.json` describes the DAG::

    {"format": "circuit-workbench", "version": 1,
     "kind": "circuit" | "compiled",
     "block_size": null | int,            # compiled only: the block size passed to engine.compile
     "tolerance": 1e-3,                   # compiled only, optional: engine.compile's tolerance
     "root": 3,                           # id of the root vector
     "vectors": [                         # children before parents; id = position in this list
       {"id": 0, "kind": "input", "num_nodes": 4, "block_size": 4, "children": [],
        "var": 0, "dist": {"name": "categorical", "num_cats": 3}, "params": "v0.params"},
       {"id": 2, "kind": "product", ..., "children": [0, 1], "edge_ids": "v2.edge_ids"},
       {"id": 3, "kind": "sum", ..., "children": [2], "edge_ids": "v3.edge_ids", "params": "v3.params"}]}

An input or sum vector may carry `"tie": <id>`: it shares the parameters of that vector (same kind and
shape; `NodeVector.tie_to`). Its own `params` are still written (equal to the source's), so a reader
that ignores `tie` gets the same distribution, untied.

`arrays.safetensors` holds the named arrays: input `params: [num_nodes, dist.num_params]` float32,
product `edge_ids: [num_blocks, num_children]` int64, sum `edge_ids: [2, num_block_edges]` int64 and
sum `params: [num_block_edges, block_size, block_size]` float32. Values round-trip bit for bit.

Loading never unpickles and never extracts: members are read into memory under size caps
(`engine.io.limits`), and every vector is rebuilt with the node constructors, so a file cannot
describe a circuit the builder API would reject. Full description: docs/file-format.md.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile

import numpy as np
import safetensors.numpy
import torch

from engine.dists import from_json as dist_from_json
from engine.io import limits
from engine.io.limits import FileFormatError
from engine.nodes import CircuitError, InputNodes, NodeVector, ProdNodes, SumNodes, tie_source

FORMAT_NAME = "circuit-workbench"
FORMAT_VERSION = 1
JSON_MEMBER = "circuit.json"
ARRAYS_MEMBER = "arrays.safetensors"


# ----------------------------------------------------------------------------------------- save


def save(obj, path) -> None:
    """Write a root `NodeVector` or a `CompiledCircuit` (after `sync_to_nodes()`) to `path`.

    The file is written to a temporary name in the same folder and renamed, so a crash never
    leaves a half-written circuit under `path`.
    """
    root, header = _unwrap(obj)
    order = root.topological()
    ids = {v.uid: i for i, v in enumerate(order)}
    arrays: dict[str, np.ndarray] = {}
    vectors = [_describe(v, i, ids, arrays) for i, v in enumerate(order)]
    _describe_ties(order, ids, vectors)
    doc = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **header, "root": ids[root.uid]}
    doc["vectors"] = vectors
    blob = safetensors.numpy.save(arrays)
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(JSON_MEMBER, json.dumps(doc, indent=1))
            zf.writestr(ARRAYS_MEMBER, blob)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _unwrap(obj) -> tuple[NodeVector, dict]:
    if isinstance(obj, NodeVector):
        return obj, {"kind": "circuit", "block_size": None}
    if hasattr(obj, "sync_to_nodes") and isinstance(getattr(obj, "root", None), NodeVector):
        obj.sync_to_nodes()
        bs = getattr(obj, "block_size", None)
        header = {"kind": "compiled", "block_size": None if bs is None else int(bs)}
        if isinstance(getattr(obj, "tolerance", None), float):
            header["tolerance"] = obj.tolerance
        return obj.root, header
    raise TypeError(f"save() needs a NodeVector root or a CompiledCircuit, got {type(obj).__name__}")


def _describe(v: NodeVector, i: int, ids: dict, arrays: dict) -> dict:
    """JSON entry of vector `i`; its arrays go into `arrays` under names `v{i}.<field>`."""
    d = {
        "id": i,
        "kind": v.kind,
        "num_nodes": v.num_nodes,
        "block_size": v.block_size,
        "children": [ids[c.uid] for c in v.children],
    }
    if v.name is not None:
        d["name"] = str(v.name)
    if isinstance(v, InputNodes):
        d["var"], d["dist"] = v.var, v.dist.to_json()
    if isinstance(v, (ProdNodes, SumNodes)):
        d["edge_ids"] = f"v{i}.edge_ids"
        arrays[d["edge_ids"]] = np.ascontiguousarray(v.edge_ids, dtype=np.int64)
    if isinstance(v, (InputNodes, SumNodes)):
        d["params"] = f"v{i}.params"
        arrays[d["params"]] = np.ascontiguousarray(v.params.detach().cpu().numpy(), dtype=np.float32)
    if not isinstance(v, (InputNodes, ProdNodes, SumNodes)):
        raise TypeError(f"cannot save node vector of type {type(v).__name__}")
    return d


def _describe_ties(order: list[NodeVector], ids: dict, vectors: list[dict]) -> None:
    """`"tie": leader id` on every tied vector but its group's leader (the source, or the first member
    saved when the source is not part of this circuit)."""
    leaders: dict[int, int] = {}  # source uid -> id of the first saved member (source not saved)
    for i, v in enumerate(order):
        if v.tied_to is None:
            continue
        src = tie_source(v)
        lead = ids[src.uid] if src.uid in ids else leaders.setdefault(src.uid, i)
        if lead != i:
            vectors[i]["tie"] = lead


# ----------------------------------------------------------------------------------------- load


def load_native(data: bytes, path: str):
    """Parse the bytes of a native file: the root `NodeVector`, or a `CompiledCircuit` for
    kind "compiled"."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as e:
        raise FileFormatError(f"{path}: corrupt or truncated zip archive ({e})") from e
    with zf:
        _check_members(zf, path)
        doc = _read_json(zf, path)
        arrays = _read_arrays(zf, path)
    root = _build(doc, arrays, path)
    if doc["kind"] == "compiled":
        import engine  # late: engine/__init__ imports this package

        options = {"tolerance": doc["tolerance"]} if "tolerance" in doc else {}
        return engine.compile(root, block_size=doc.get("block_size"), **options)
    return root


def _check_members(zf: zipfile.ZipFile, path: str) -> None:
    names = zf.namelist()
    if len(names) > limits.MAX_MEMBERS:
        raise FileFormatError(f"{path}: archive has {len(names)} members (at most {limits.MAX_MEMBERS})")
    if len(set(names)) != len(names):
        raise FileFormatError(f"{path}: archive has duplicate member names")
    for n in names:
        if n not in (JSON_MEMBER, ARRAYS_MEMBER):
            raise FileFormatError(
                f"{path}: unexpected archive member {n!r} (a circuit file holds only "
                f"{JSON_MEMBER} and {ARRAYS_MEMBER})"
            )
    for n in (JSON_MEMBER, ARRAYS_MEMBER):
        if n not in names:
            raise FileFormatError(f"{path}: archive has no {n}; is this a circuit file?")


def _read_json(zf: zipfile.ZipFile, path: str) -> dict:
    raw = limits.read_member(zf, JSON_MEMBER, limits.json_limit(), path)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FileFormatError(f"{path}: {JSON_MEMBER} is not valid JSON ({e})") from e
    except RecursionError:
        raise FileFormatError(
            f"{path}: {JSON_MEMBER} is nested too deeply to be a circuit description"
        ) from None
    if not isinstance(doc, dict):
        raise FileFormatError(f"{path}: {JSON_MEMBER} must hold a JSON object")
    if doc.get("format") != FORMAT_NAME:
        raise FileFormatError(f"{path}: {JSON_MEMBER} has format {doc.get('format')!r}, not {FORMAT_NAME!r}")
    version = _field(doc, "version", int, path, JSON_MEMBER)
    if version > FORMAT_VERSION:
        raise FileFormatError(
            f"{path}: file format version {version} is newer than this engine supports ({FORMAT_VERSION})"
        )
    if version < 1:
        raise FileFormatError(f"{path}: invalid file format version {version}")
    if _field(doc, "kind", str, path, JSON_MEMBER) not in ("circuit", "compiled"):
        raise FileFormatError(f"{path}: kind must be 'circuit' or 'compiled', got {doc['kind']!r}")
    if doc.get("block_size") is not None:
        _field(doc, "block_size", int, path, JSON_MEMBER)
    if "tolerance" in doc and not 0 <= _field(doc, "tolerance", float, path, JSON_MEMBER) < float("inf"):
        raise FileFormatError(f"{path}: tolerance must be a finite number >= 0, got {doc['tolerance']!r}")
    _field(doc, "root", int, path, JSON_MEMBER)
    if not _field(doc, "vectors", list, path, JSON_MEMBER):
        raise FileFormatError(f"{path}: {JSON_MEMBER} lists no vectors")
    return doc


def _read_arrays(zf: zipfile.ZipFile, path: str) -> dict[str, np.ndarray]:
    raw = limits.read_safetensors_member(zf, ARRAYS_MEMBER, limits.arrays_limit(), path)
    try:
        return safetensors.numpy.load(raw)
    except Exception as e:  # SafetensorError is not exported under a stable name
        raise FileFormatError(f"{path}: {ARRAYS_MEMBER} is corrupt ({e})") from e


def _field(d: dict, key: str, typ: type, path: str, where: str):
    """`d[key]`, checked to be present and of type `typ` (bool is not an int here)."""
    if not isinstance(d, dict) or key not in d:
        raise FileFormatError(f"{path}: {where} is missing key {key!r}")
    val = d[key]
    if not isinstance(val, typ) or (typ is int and isinstance(val, bool)):
        raise FileFormatError(f"{path}: {where}: {key!r} must be {typ.__name__}, got {val!r:.60}")
    return val


def _build(doc: dict, arrays: dict, path: str) -> NodeVector:
    built: list[NodeVector] = []
    for i, d in enumerate(doc["vectors"]):
        where = f"vector {i}"
        if not isinstance(d, dict) or _field(d, "id", int, path, where) != i:
            raise FileFormatError(f"{path}: {where} must be an object with id {i} (ids follow list order)")
        kind = _field(d, "kind", str, path, where)
        if kind not in _BUILDERS:
            raise FileFormatError(f"{path}: {where} has unknown kind {kind!r}")
        kids = []
        for c in _field(d, "children", list, path, where):
            if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c < i:
                raise FileFormatError(
                    f"{path}: {where} refers to undefined vector {c!r} (children must come earlier)"
                )
            kids.append(built[c])
        fields = _Fields(d, arrays, path, f"{where} ({kind})")
        try:
            v = _BUILDERS[kind](fields, kids)
        except (CircuitError, ValueError) as e:
            if isinstance(e, FileFormatError):
                raise
            raise FileFormatError(f"{path}: {fields.where}: {e}") from e
        if v.num_nodes != fields.num_nodes:
            raise FileFormatError(
                f"{path}: {fields.where} declares {fields.num_nodes} nodes but its arrays give {v.num_nodes}"
            )
        name = d.get("name")
        v.name = name if isinstance(name, str) else None
        built.append(v)
    for i, d in enumerate(doc["vectors"]):
        if "tie" not in d:
            continue
        j = d["tie"]
        if not isinstance(j, int) or isinstance(j, bool) or not 0 <= j < len(built) or j == i:
            raise FileFormatError(f"{path}: vector {i} ties to {j!r}, which is not another vector id")
        try:
            built[i].tie_to(built[j])
        except CircuitError as e:
            raise FileFormatError(f"{path}: vector {i}: {e}") from e
    root = doc["root"]
    if not 0 <= root < len(built):
        raise FileFormatError(f"{path}: root {root} is not a vector id (0..{len(built) - 1})")
    return built[root]


class _Fields:
    """Typed access to one vector's JSON entry and its arrays, with errors naming file and vector."""

    def __init__(self, d: dict, arrays: dict, path: str, where: str):
        self.d, self.arrays, self.path, self.where = d, arrays, path, where
        self.num_nodes = self.int("num_nodes")
        self.block_size = self.int("block_size")
        if self.num_nodes < 1 or self.block_size < 1 or self.num_nodes % self.block_size:
            raise FileFormatError(
                f"{path}: {where}: block_size {self.block_size} must divide num_nodes {self.num_nodes} (both >= 1)"
            )

    def int(self, key: str) -> int:
        return _field(self.d, key, int, self.path, self.where)

    def array(self, key: str, dtype: str, shape: tuple) -> np.ndarray:
        """Array named by `d[key]`, of dtype kind `dtype` ("f4" or "int"), shape `shape` (None = any)."""
        name = _field(self.d, key, str, self.path, self.where)
        if name not in self.arrays:
            raise FileFormatError(f"{self.path}: {self.where}: array {name!r} is not in {ARRAYS_MEMBER}")
        a = self.arrays[name]
        ok = a.dtype == np.float32 if dtype == "f4" else np.issubdtype(a.dtype, np.integer)
        if not ok:
            raise FileFormatError(f"{self.path}: {self.where}: array {name!r} has dtype {a.dtype}")
        if a.ndim != len(shape) or any(s is not None and s != n for s, n in zip(shape, a.shape)):
            want = tuple("*" if s is None else s for s in shape)
            raise FileFormatError(
                f"{self.path}: {self.where}: array {name!r} has shape {a.shape}, expected {want}"
            )
        return np.array(a, dtype=np.float32 if dtype == "f4" else np.int64)  # writable copy


def _build_input(f: _Fields, kids: list) -> InputNodes:
    if kids:
        raise FileFormatError(f"{f.path}: {f.where} must have no children")
    try:
        dist = dist_from_json(_field(f.d, "dist", dict, f.path, f.where))
    except (KeyError, TypeError, ValueError) as e:
        raise FileFormatError(f"{f.path}: {f.where}: bad distribution ({e})") from e
    params = f.array("params", "f4", (f.num_nodes, dist.num_params))
    return InputNodes(
        f.int("var"), f.num_nodes, dist, params=torch.from_numpy(params), block_size=f.block_size
    )


def _build_product(f: _Fields, kids: list) -> ProdNodes:
    edges = f.array("edge_ids", "int", (f.num_nodes // f.block_size, len(kids)))
    return ProdNodes(kids, edge_ids=edges, block_size=f.block_size)


def _build_sum(f: _Fields, kids: list) -> SumNodes:
    edges = f.array("edge_ids", "int", (2, None))
    bs = f.block_size
    params = f.array("params", "f4", (edges.shape[1], bs, bs))
    v = SumNodes(kids, f.num_nodes, edge_ids=edges, block_size=bs, params=torch.from_numpy(params))
    stored = torch.from_numpy(params)
    if np.array_equal(v.edge_ids, edges) and torch.allclose(v.params, stored, rtol=0, atol=1e-6):
        v.params = stored  # already normalised: keep the saved float32 values bit for bit
    return v


_BUILDERS = {"input": _build_input, "product": _build_product, "sum": _build_sum}
