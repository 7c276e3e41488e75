"""batchseg on several Ray nodes: placement that fits every node, the stall line, a node's death.

The clusters are real: `ray.cluster_utils.Cluster` starts one GCS and several raylets on this
machine (the way Ray's own tests do). This test process starts and kills the nodes but never
connects to them (the session's single-node Ray may be connected here); each run is
`python -m batchseg run --ray-address ADDRESS`, as a user's would be.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from batchseg.config import ConfigError, load_config
from batchseg.run import placement, stall
from batchseg.samples import write_samples
from tests.conftest import REPO, keeping_sessions_ray_client, read_rows

ORACLE = "tests.oracle:ColorKeyBackend"
SLOW = "tests.run.multinode_parts:SlowColorKey"


def node(cpus: float, **resources: float) -> placement.Node:
    return placement.Node(f"n{id(resources)}", "127.0.0.1", {"CPU": cpus, **resources})


def job(**more):
    return load_config(None, [(["inputs"], ["/x"]), (["output"], "/o")] + [([k], v) for k, v in more.items()])


def spare_everywhere(nodes: list[placement.Node], actors: int, resources: dict[str, float]) -> bool:
    """Wherever Ray puts `actors` whole-CPU actors (every assignment that fits the nodes),
    does some node keep a whole CPU free?"""
    capacity = [min([n.cpus] + [n.units(k, v) for k, v in resources.items()]) for n in nodes]
    for counts in itertools.product(*[range(c + 1) for c in capacity]):
        if sum(counts) == actors and all(n.cpus - c < 1 for n, c in zip(nodes, counts)):
            return False
    return True


SHAPES = [  # (node CPUs, per-node accelerator units or None): KubeRay heads, uneven and GPU nodes
    ([0, 1, 1], None), ([1, 2, 1], None), ([0, 2, 2], None), ([4], None), ([0, 1, 1, 1, 1], None),
    ([2.5, 1.5], None), ([0, 2, 1], [0, 1, 1]), ([0, 8, 1, 1], [0, 0, 1, 1]), ([1, 1], [1, 1]), ([0, 4, 4], [0, 2, 2]),
]


@pytest.mark.parametrize("cpus,accel", SHAPES)
def test_gpu_actors_leave_a_whole_cpu_on_some_node_wherever_ray_puts_them(cpus, accel):
    """Beside GPU actors the decode tasks ask for a CPU: some node keeps one whatever Ray does."""
    nodes = [node(c, GPU=a) for c, a in zip(cpus, accel or cpus)]
    where = placement.place(job(device="cuda"), tuple(nodes))
    slots = sum(min(n.cpus, n.units("GPU", 1)) for n in nodes)
    if sum(n.cpus for n in nodes) == 1:
        assert (where.actors, where.cpus_per_actor) == (1, 0.0)  # nothing to spare: it shares the core
        return
    assert where.actors >= 1 and where.cpus_per_actor == 1.0
    assert spare_everywhere(nodes, where.actors, where.resources), where
    assert not spare_everywhere(nodes, where.actors + 1, where.resources) or where.actors == slots  # no smaller


@pytest.mark.parametrize("cpus,accel", SHAPES)
def test_cpu_actors_take_every_whole_cpu(cpus, accel):
    """On device cpu nothing but the actors asks for a CPU (listing, planning, reading and
    writing ask for none; test_pipeline checks the graph): every slot gets an actor."""
    nodes = [node(c, **({"accel": a} if accel else {})) for c, a in zip(cpus, accel or cpus)]
    where = placement.place(job(device="cpu", **({"actor_resource": "accel"} if accel else {})), tuple(nodes))
    assert where.cpus_per_actor == 1.0
    assert where.actors == sum(min([n.cpus] + [n.units(k, v) for k, v in where.resources.items()]) for n in nodes)


def test_gpu_actors_are_counted_per_node_and_never_by_the_clusters_sum():
    # two GPU nodes of 1 CPU each beside a 0-CPU head: the cluster has 2 GPUs, but one actor's
    # CPU must stay free for decode; 2 CPUs and 4 GPUs on one node give 1 actor, not 4
    assert placement.place(job(device="cuda"), (node(0), node(1, GPU=1), node(1, GPU=1))).actors == 1
    assert placement.place(job(device="cuda"), (node(0), node(2, GPU=4))).actors == 1
    assert placement.place(job(device="cuda", gpus_per_actor=0.5), (node(0), node(8, GPU=2), node(4))).actors == 4


def test_a_single_cpu_gets_one_actor_and_a_pool_too_large_is_kept_with_a_warning(caplog):
    assert (lambda one: (one.actors, one.cpus_per_actor))(placement.place(job(device="cpu"), (node(0), node(1)))) == (1, 1.0)
    big = placement.place(job(device="cpu", num_actors=6), (node(1), node(2), node(2)))
    assert (big.actors, big.fits) == (6, 5)
    assert "set num_actors <= 5, or add a node" in caplog.text
    assert big.shape() == "3 nodes: 1+2+2 CPUs"


def test_a_cpu_actor_decodes_on_the_clusters_cpus_per_actor_rounded_up():
    assert placement.place(job(device="cpu"), (node(2),)).threads_per_actor == 1  # 2 actors, 2 CPUs
    assert placement.place(job(device="cpu", num_actors=1), (node(2),)).threads_per_actor == 2
    assert placement.place(job(device="cpu", num_actors=3), (node(0), node(8), node(8))).threads_per_actor == 6


def cluster_now(nodes, free, demands, can_add=False):
    return stall.ClusterNow(tuple(nodes), {n.node_id: f for n, f in zip(nodes, free)}, demands, can_add)


def test_the_stall_line_names_the_demand_the_shape_and_the_fix():
    nodes = [placement.Node("h", "a", {"CPU": 1}), placement.Node("w1", "b", {"CPU": 2}),
             placement.Node("w2", "c", {"CPU": 2})]
    where = placement.place(job(device="cpu", num_actors=5), tuple(nodes))
    ours = cluster_now(nodes, [{"CPU": 0}] * 3, [{"CPU": 1.0}, {"CPU": 1.0}])
    assert stall.stall_line(180, ours, where, 5, 900) == (
        "batchseg: waiting 3m00s for {CPU: 1}: every node's CPU is held (3 nodes: 1+2+2 CPUs; 5 by this run's 5 "
        "predictor actors); set num_actors <= 4, or add a node; stopping at 15m00s (stall_deadline_s)")
    scaling = cluster_now(nodes, [{"CPU": 0}] * 3, [{"CPU": 1.0}], can_add=True)
    assert stall.stall_line(200, scaling, where, 5, 900).endswith("; an autoscaler can add a node: waiting for it")
    gpu = cluster_now(nodes, [{"CPU": 1}] * 3, [{"CPU": 1.0, "GPU": 1.0}])
    assert stall.stall_line(60, gpu, where, 0, None) == (
        "batchseg: waiting 1m00s for {CPU: 1, GPU: 1}: no node has GPU (3 nodes: 1+2+2 CPUs, 0+0+0 GPU); add a node "
        "with GPU, or run with --device cpu; waiting (stall_deadline_s is unset)")
    assert cluster_now(nodes, [{"CPU": 1}] * 3, [{"CPU": 1.0}]).unmet() == []  # a demand that fits: no stall


def test_an_autoscaler_is_one_that_can_launch_nodes():
    readonly = {"autoscaler_report": {"node_type_mapping": {"ab12": "node_ab12", "cd34": "node_cd34"}}}
    configured = {"autoscaler_report": {"node_type_mapping": {"ab12": "ray.head.default", "cd34": "gpu-workers"}}}
    assert not stall.autoscaler_can_add("0", readonly, pending=False)
    assert not stall.autoscaler_can_add(None, None, pending=False)
    assert stall.autoscaler_can_add("0", configured, pending=False)
    assert stall.autoscaler_can_add("7", None, pending=False)  # KubeRay's v2 autoscaler has reported
    assert stall.autoscaler_can_add("0", readonly, pending=True)


def test_stall_settings_are_checked_before_anything_starts():
    with pytest.raises(ConfigError, match=r"stall_deadline_s \(10\) must be >= stall_timeout_s \(60\)"):
        job(stall_timeout_s=60.0, stall_deadline_s=10.0)


# --- real clusters ------------------------------------------------------------------------


@pytest.fixture
def clusters():
    """Makes local multi-node clusters; kills every node at the end (one by one: Cluster.shutdown
    would also reset this process's Ray client state)."""
    from ray.cluster_utils import Cluster

    made = []

    def make(head_cpus: int, *workers: dict) -> tuple[Cluster, list]:
        cluster = Cluster(initialize_head=True, connect=False,
                          head_node_args={"num_cpus": head_cpus, "include_dashboard": False})
        made.append(cluster)
        return cluster, [cluster.add_node(**args) for args in workers]

    with keeping_sessions_ray_client():
        yield make
        for cluster in made:
            for n in list(cluster.worker_nodes):
                cluster.remove_node(n, allow_graceful=False)
            if cluster.head_node is not None:
                cluster.remove_node(cluster.head_node, allow_graceful=False)


@pytest.fixture(scope="module")
def lake(tmp_path_factory) -> tuple[Path, int]:
    """Three copies of the sample lake (images and tar shards, no bad file): 51 images."""
    root = tmp_path_factory.mktemp("lake")
    count = sum(len(write_samples(root / name)["images"]) for name in ("a", "b", "c"))
    return root, count


def run_command(address: str, lake: Path, out: Path, *more: str, backend: str = ORACLE) -> list[str]:
    return [sys.executable, "-m", "batchseg", "run", "--input", str(lake), "--output", str(out), "--device", "cpu",
            "--backend", backend, "--score-threshold", "0", "--batch-size", "4", "--ray-address", address,
            "--set", "read_rows_per_block=4", *more]


def batchseg_run(address: str, lake: Path, out: Path, *more: str, timeout: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run(run_command(address, lake, out, *more), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def blockers(verb: str, address: str, cpus: int) -> None:
    subprocess.run([sys.executable, "-m", "tests.run.multinode_parts", verb, address, str(cpus)], cwd=REPO,
                   check=True, capture_output=True, timeout=90)


def assert_exactly_once(out: Path, images: int) -> dict:
    """Every image once in the Parquet rows and in the ledger; returns the run report."""
    from fsspec.implementations.local import LocalFileSystem

    from batchseg.store.ledger import OK, read_ledger

    rows = read_rows(str(out / "annotations"))
    assert len(rows) == images and len({r["image_id"] for r in rows}) == images
    assert [r["error"] for r in rows if r["error"]] == []
    table, _ = read_ledger(LocalFileSystem(), str(out))
    assert int((table["status"].to_numpy() == OK).sum()) == images
    report = json.loads((out / "run.json").read_text())
    assert report["images"] == {"in": images, "annotated": images, "failed": 0}
    return report


@pytest.mark.timeout(300)
def test_a_zero_cpu_head_with_one_cpu_workers_then_accelerator_nodes(clusters, lake, tmp_path):
    root, images = lake
    cluster, _ = clusters(0, {"num_cpus": 1}, {"num_cpus": 1})
    done = batchseg_run(cluster.address, root, tmp_path / "small")
    assert done.returncode == 0, done.stderr[-3000:]
    report = assert_exactly_once(tmp_path / "small", images)
    assert report["cluster"]["shape"] == "3 nodes: 0+1+1 CPUs"
    assert report["actors"]["min"] == 2 and report["actors"]["cpus_each"] == 1.0  # one on each worker

    for n in list(cluster.worker_nodes):  # the same head, now with two "GPU" nodes of 2 and 1 CPUs
        cluster.remove_node(n)
    cluster.add_node(num_cpus=2, resources={"accel": 1})
    cluster.add_node(num_cpus=1, resources={"accel": 1})
    done = batchseg_run(cluster.address, root, tmp_path / "accel", "--set", "actor_resource=accel")
    assert done.returncode == 0, done.stderr[-3000:]
    report = assert_exactly_once(tmp_path / "accel", images)
    assert report["cluster"]["shape"] == "3 nodes: 0+2+1 CPUs, 0+1+1 accel"
    assert report["actors"]["min"] == 2 and report["actors"]["resources_each"] == {"accel": 1.0}


@pytest.mark.timeout(240)
def test_a_shape_that_cannot_run_says_so_exits_5_and_the_next_run_finishes(clusters, lake, tmp_path):
    root, images = lake
    cluster, _ = clusters(0, {"num_cpus": 1}, {"num_cpus": 1})
    blockers("hold", cluster.address, 2)  # other work holds every CPU of the cluster
    started = time.monotonic()
    stalled = batchseg_run(cluster.address, root, tmp_path / "out", "--set", "stall_timeout_s=4",
                           "--set", "stall_deadline_s=12")
    took = time.monotonic() - started
    assert stalled.returncode == 5, stalled.stderr[-3000:]
    lines = [line for line in stalled.stderr.splitlines() if line.startswith("batchseg: waiting")]
    assert lines, stalled.stderr[-3000:]
    assert lines[-1].split(" for ", 1)[1] == ("{CPU: 1}: every node's CPU is held (3 nodes: 0+1+1 CPUs; 2 by other "
                                              "work); free what other work holds, or add a node; stopping at 12s "
                                              "(stall_deadline_s)")
    assert "batchseg: stopped, stalled: waiting" in stalled.stderr.splitlines()[-1]
    assert took < 90  # the deadline (12 s) plus starting the run, not a hang
    [report] = [json.loads(p.read_text()) for p in (tmp_path / "out/runs").glob("*.json")]
    assert report["status"] == "stalled" and report["error"].startswith("RunStalled: waiting")
    print(lines[-1])  # the line a user sees, for the note

    blockers("release", cluster.address, 2)
    done = batchseg_run(cluster.address, root, tmp_path / "out")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_exactly_once(tmp_path / "out", images)


def change_mid_run(command: list[str], change: Callable[[], object]) -> tuple[int, str]:
    """Start `command` (a batchseg run), `change` the cluster once the run has committed its
    first part, and wait for the run: (exit code, stderr)."""
    out = Path(command[command.index("--output") + 1])
    run = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 150
        while not list(out.glob("annotations/run=*/*.parquet")) and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert run.poll() is None, "the run ended before the cluster could be changed"
        change()
        _, stderr = run.communicate(timeout=200)
    finally:
        run.kill()
    return run.returncode, stderr


NODE_DEATHS = {
    # 2 actors (set by hand) on 1+2+2 CPUs: whichever node dies, the survivors hold the pool
    "the survivors hold the pool": (1, [{"num_cpus": 2}, {"num_cpus": 2}], ["--num-actors", "2"]),
    # "accelerator" nodes of 3 CPUs + 2 accel and 2 CPUs + 1 accel hold 3 actors, 2 of them on
    # the first; once it dies, the survivor holds 1: the lost actors' calls wait for a restart
    # that only happens when the survivor's actor has no more work and Ray Data lets it go
    "the survivors hold 1 of 3 actors": (0, [{"num_cpus": 3, "resources": {"accel": 2}},
                                             {"num_cpus": 2, "resources": {"accel": 1}}], ["--set", "actor_resource=accel"]),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("head_cpus, workers, flags", NODE_DEATHS.values(), ids=NODE_DEATHS.keys())
def test_a_worker_node_killed_mid_run_loses_no_image_and_doubles_none(clusters, lake, tmp_path, head_cpus, workers,
                                                                       flags):
    root, images = lake
    cluster, (doomed, _) = clusters(head_cpus, *workers)
    out = tmp_path / "out"
    code, stderr = change_mid_run(run_command(cluster.address, root, out, "--set", "rows_per_file=4", *flags, backend=SLOW),
                                  lambda: cluster.remove_node(doomed, allow_graceful=False))
    assert code == 0, stderr[-3000:]
    report = assert_exactly_once(out, images)
    assert [n["node_id"] for n in report["cluster"]["nodes_lost"]] == [doomed.node_id]
    assert sum(report["cluster"]["retries"].values()) >= 1, report["cluster"]
    print(report["cluster"], report["actors"])


@pytest.mark.timeout(300)
def test_a_node_that_joins_mid_run_gets_predictor_actors_up_to_max_actors(clusters, lake, tmp_path):
    """A node added mid-run, as an autoscaler adds one (none runs here: the test adds it): Ray
    Data's actor pool grows onto it up to max_actors. The actors ask for one `accel` unit each,
    so the pool can grow only where a node brings one."""
    root, images = lake
    cluster, _ = clusters(1, {"num_cpus": 2, "resources": {"accel": 1}})
    out = tmp_path / "out"
    joined = []
    code, stderr = change_mid_run(
        run_command(cluster.address, root, out, "--set", "rows_per_file=4", "--set", "actor_resource=accel",
                    "--set", "max_actors=2", backend="tests.run.multinode_parts:SlowerColorKey"),
        lambda: joined.append(cluster.add_node(num_cpus=2, resources={"accel": 1})))
    assert code == 0, stderr[-3000:]
    report = assert_exactly_once(out, images)
    assert (report["actors"]["min"], report["actors"]["max"]) == (1, 2)
    assert [n["node_id"] for n in report["cluster"]["nodes_joined"]] == [joined[0].node_id]
    assert report["cluster"]["predictor_actors"].get(joined[0].node_id) == 1, report["cluster"]
