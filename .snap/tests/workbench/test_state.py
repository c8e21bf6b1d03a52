"""Session state without a browser: building circuits, plan what-ifs, schedules, runs, uploads, store."""

import numpy as np
import pytest

import engine
from workbench.services import circuits, plans, uploads
from workbench.services.store import RunStore
from workbench.state import BuildState, CompareState, GraphSpec, PlanState, RunState


@pytest.fixture(autouse=True)
def _runs_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CW_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("CW_UPLOAD_DIR", str(tmp_path / "uploads"))


@pytest.mark.parametrize(
    "template, dataset, params",
    [
        ("hclt", "nltcs", {"num_latents": 4}),
        ("pd", "digits", {"num_latents": 4, "data_shape": [8, 8], "split_intervals": 4}),
        ("rat_spn", "nltcs", {"num_latents": 4, "depth": 2, "num_repetitions": 2}),
        ("hmm", "nltcs", {"num_latents": 4}),
    ],
)
def test_each_template_builds_and_plans(template, dataset, params):
    b = BuildState()
    b.data.dataset = dataset
    b.template.param.update(template=template, **params)
    res = b.build()
    assert res.ok, res.error
    assert res.info["num_vars"] == b.data.summary["num_vars"]
    plan = PlanState(root=b.root)
    assert plan.error == "" and plan.sum_layers and plan.summary["memory_bytes"]["total"] > 0


def test_template_errors_are_readable():
    b = BuildState()
    b.data.dataset = "nltcs"
    b.template.param.update(template="pd", data_shape=[4, 5], split_intervals=2)
    res = b.build()
    assert not res.ok and "20 variables" in res.error and "16" in res.error
    b.data.dataset = "no-such-dataset"
    b.template.template = "hclt"
    assert "unknown dataset" in b.build().error


def _two_var_graph() -> GraphSpec:
    return GraphSpec.example()


def test_graph_valid_builds_and_compiles():
    b = BuildState(source="graph", graph=_two_var_graph())
    res = b.build()
    assert res.ok, res.error
    pc = engine.compile(res.root)
    x = np.array([[0, 1], [1, 0]])
    assert pc(x).shape == (2,)


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda g: (g.add_node("input", 4, var=0, id="dup"), g.connect("prod", "dup")), "not decomposable"),
        (lambda g: (g.add_node("input", 4, var=5, id="other"), g.connect("root", "other")), "not smooth"),
        (lambda g: g.add_node("sum", 1, id="second"), "exactly one root"),
        (lambda g: g.connect("x0", "prod"), "cycle"),
        (lambda g: g.update_node("prod", kind="bogus"), "unknown kind"),
        (lambda g: g.update_node("root", num_nodes=3), "exactly one node"),
        (lambda g: g.update_node("x1", num_nodes=3), "node 'prod'"),
        (lambda g: g.clear(), "empty"),
    ],
)
def test_graph_invalid_reports_reason(mutate, reason):
    g = _two_var_graph()
    mutate(g)
    res = BuildState(source="graph", graph=g).build()
    assert not res.ok and reason in res.error, res.error


def _mixed_block_graph() -> GraphSpec:
    """Sum A (block 4, 2 child blocks) and sum B (block 2, 5 child blocks) in one sum layer."""
    g = GraphSpec()
    for var, n in ((0, 8), (1, 8), (2, 10), (3, 10)):
        g.add_node("input", n, var=var, id=f"x{var}")
    g.add_node("product", 8, id="pa")
    g.add_node("product", 10, id="pb")
    g.add_node("sum", 8, id="A", block_size=4)
    g.add_node("sum", 8, id="B", block_size=2)
    g.add_node("product", 8, id="top")
    g.add_node("sum", 1, id="root")
    for p, c in (
        ("pa", "x0"),
        ("pa", "x1"),
        ("pb", "x2"),
        ("pb", "x3"),
        ("A", "pa"),
        ("B", "pb"),
        ("top", "A"),
        ("top", "B"),
        ("root", "top"),
    ):
        g.connect(p, c)
    return g


def test_what_if_padding_changes_with_block_size():
    res = BuildState(source="graph", graph=_mixed_block_graph()).build()
    assert res.ok, res.error
    ps = PlanState(root=res.root, tolerance=0.25)
    assert ps.padding_ratio == 0.0  # own block sizes 4 and 2: separate partitions
    parts_before = ps.sum_layers[0]["num_partitions"]
    ps.block_size = 2  # both become 2x2 tiles with degrees 4 and 5: one padded partition
    assert ps.sum_layers[0]["padding_ratio"] == pytest.approx(0.1) and 0 < ps.padding_ratio < 0.1
    assert ps.sum_layers[0]["num_partitions"] < parts_before
    ps.tolerance = 0.0
    assert ps.padding_ratio == 0.0


def test_what_if_rejects_bad_block_size():
    ps = PlanState()
    with pytest.raises(ValueError):
        ps.block_size = 3


def test_block_matrix_counts_real_edges_and_downsamples():
    b = BuildState()
    b.template.num_latents = 8
    ps = PlanState(root=b.build().root)
    layer = ps.sum_layers[0]["layer"]
    full = ps.block_matrix(layer, max_cells=10_000)
    assert not full.downsampled and full.values.max() == 1.0
    assert full.values.sum() == pytest.approx(full.num_blocks)  # one cell per real block pair
    small = ps.block_matrix(layer, max_cells=2)
    assert small.downsampled and small.values.shape[0] <= 2 and small.values.shape[1] <= 2
    # mass is conserved: occupied area equals the real edge count
    edges = sum(p["num_edges"] for p in ps.sum_layers[0]["partitions"])
    assert small.values.sum() * small.row_unit * small.col_unit == pytest.approx(edges)


def test_schedule_order_and_roofline():
    res = BuildState(source="graph", graph=_mixed_block_graph()).build()
    ps = PlanState(root=res.root)
    sched = ps.schedule(measured={(0, "forward"): 1.5})
    kinds = [layer["kind"] for layer in ps.layers]
    n = len(kinds)
    fwd, bwd = sched[:n], sched[n:]
    assert [r["layer"] for r in fwd] == list(range(n)) and all(r["pass"] == "forward" for r in fwd)
    sums = [i for i, k in enumerate(kinds) if k == "sum"][::-1]
    expected = []
    for s in sums:
        expected += [(s - 1, "recompute"), (s, "backward"), (s - 1, "backward")]
    expected += [(i, "backward") for i, k in enumerate(kinds) if k == "input"]
    assert [(r["layer"], r["pass"]) for r in bwd] == expected
    assert sched[0]["measured_ms"] == 1.5 and sched[1]["measured_ms"] is None
    ps.peak_flops, ps.bandwidth = 1e20, 1e20  # only launch overhead remains
    assert all(
        r["predicted_ms"] == pytest.approx(0.005 * max(1, len(ps.plan.layers[r["layer"]].partitions)))
        for r in ps.schedule()
    )
    assert plans.pass_order(ps.plan)[n][1] == "recompute"


def test_file_import_roundtrip_and_errors(tmp_path):
    root = GraphSpec.example()
    built = circuits.build(root.to_dict()).root
    path = tmp_path / "c.cwpc"
    engine.save(built, path)
    b = BuildState(source="file", file_path=str(path))
    assert b.build().ok
    bad = tmp_path / "bad.cwpc"
    bad.write_bytes(b"\x80\x04garbage")
    b.file_path = str(bad)
    assert "pickle" in b.build().error
    b.file_path = str(tmp_path / "missing.cwpc")
    assert "not found" in b.build().error
    res = uploads.save_circuit_upload("c.cwpc", path.read_bytes())
    assert res.ok and res.summary["num_vars"] == 2
    assert "too large" in uploads.save_circuit_upload("c.cwpc", path.read_bytes(), max_bytes=10).error
    assert uploads.save_circuit_upload("nltcs.cw", path.read_bytes()).ok  # the name README uses


def test_circuit_upload_widget_accepts_every_suffix_the_service_takes():
    from workbench.views.builder import FileImport

    view = FileImport(build=BuildState())
    assert set(view.upload.accept.split(",")) == set(uploads.CIRCUIT_SUFFIXES)


def test_data_upload_validates_without_unpickling(tmp_path):
    import io

    x = np.random.default_rng(0).integers(0, 2, size=(200, 6))
    buf = io.BytesIO()
    np.save(buf, x)
    res = uploads.save_data_upload("mine.npy", buf.getvalue())
    assert res.ok, res.error
    assert res.summary["num_vars"] == 6 and res.summary["kind"] == "binary"
    csv = "\n".join(",".join(map(str, row)) for row in x).encode()
    assert uploads.save_data_upload("mine.csv", csv).ok
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    res = uploads.save_data_upload("evil.npy", obj.getvalue())
    assert not res.ok and "pickle" in res.error
    assert "too large" in uploads.save_data_upload("mine.npy", buf.getvalue(), max_bytes=100).error
    assert "unsupported file type" in uploads.save_data_upload("mine.pkl", b"x").error
    assert "empty" in uploads.save_data_upload("mine.npy", b"").error
    b = BuildState()
    b.data.dataset = res.path or "missing.npy"
    assert b.data.load() is None and b.data.error


@pytest.mark.parametrize(
    "save, filename, data",
    [
        (uploads.save_data_upload, "my data.csv", b"a,b\n0,nan\n1,0\n"),
        (uploads.save_data_upload, "scores.npz", b"not a zip"),
        (uploads.save_data_upload, "objects.npy", None),  # a pickled object array
        (uploads.save_circuit_upload, "model.cwpc", b"junk"),
        (uploads.save_circuit_upload, "model.zip", b"PK\x03\x04junk"),
    ],
    ids=["csv-nan", "npz-not-zip", "npy-pickle", "cwpc-junk", "zip-truncated"],
)
def test_upload_errors_name_the_uploaded_file(tmp_path, save, filename, data):
    """Errors name the file as the user uploaded it, never the server's stored copy."""
    import io

    if data is None:
        buf = io.BytesIO()
        np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        data = buf.getvalue()
    res = save(filename, data)
    assert not res.ok
    assert filename in res.error, res.error
    assert str(uploads.upload_dir()) not in res.error and "uploads" not in res.error, res.error
    assert list(uploads.upload_dir().iterdir()) == []  # the rejected file is not kept


def test_run_state_folds_events_and_compare(tmp_path):
    store = RunStore(tmp_path / "s")
    rid = store.create({"circuit": {"source": "template", "template": "hclt"}, "dataset": "nltcs"}, name="a")
    events = [
        {"type": "status", "status": "running", "device": "cpu", "t": 1.0},
        {
            "type": "batch",
            "epoch": 1,
            "batch": 2,
            "num_batches": 4,
            "ll": -7.0,
            "examples_per_s": 1e4,
            "t": 1.1,
        },
        {
            "type": "layer_times",
            "epoch": 1,
            "batch": 2,
            "t": 1.2,
            "records": [{"layer": 0, "kind": "input", "pass": "forward", "ms": 2.0, "calls": 2}],
        },
        {
            "type": "layer_times",
            "epoch": 1,
            "batch": 4,
            "t": 1.3,
            "records": [{"layer": 0, "kind": "input", "pass": "forward", "ms": 1.0, "calls": 2}],
        },
        {"type": "memory", "allocated": 1, "reserved": 2, "peak_allocated": 3, "peak_reserved": 4, "t": 1.3},
        {"type": "epoch", "epoch": 1, "train_ll": -7.0, "valid_ll": -7.1, "test_ll": -7.2, "seconds": 0.5},
        {"type": "done", "status": "done", "model": "m", "seconds": 1.0},
    ]
    store.append_events(rid, events)
    store.set_status(rid, "done")
    run = RunState.from_store(store, rid)
    assert run.status == "done" and run.device == "cpu" and run.epochs["valid_ll"] == [-7.1]
    assert run.batches["step"] == [2] and run.layer_means[(0, "forward")] == pytest.approx(1.5)
    assert run.memory["peak_reserved"] == 4 and run.summary()["test_ll"] == -7.2
    v = run.version
    assert not run.apply([]) and run.version == v
    cmp = CompareState()
    cmp.add(run)
    cmp.add_from_store(store, rid)  # same id replaces
    assert len(cmp.runs) == 1
    ((label, (xs, ys)),) = cmp.series("train_ll").items()
    assert xs == [1] and ys == [-7.0] and "a" in label
    assert [r.run_id for r in store.list_runs()] == [rid]
    assert store.archive(rid)[:2] == b"PK"
    with pytest.raises(ValueError):
        store.path("../etc")


def test_a_plan_compiled_in_a_build_thread_reports_its_compile_time():
    """The Partitions totals said "planned in 0 ms" when the plan was compiled by prepare()."""
    b = BuildState()
    assert b.build_demo().ok
    plan = PlanState()
    plan.prepare(b.root)
    compiled = plan._prepared[3]
    plan.root = b.root
    assert plan.plan is not None and compiled > 0 and plan.seconds >= compiled
