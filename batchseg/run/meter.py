"""What the predictor actors measure while a run goes, gathered in one small actor.

Each predictor actor (stages.Annotate) keeps its own timers (`ActorTimes`) and sends them,
cumulative, after each call; the driver reads them for the progress line (images and images/s
per actor) and for run.json's time split and bottleneck line (batchseg.run.report). The
module imports Ray only in `start_meter`, so the stages that hold a meter import without it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class ActorTimes:
    """One predictor actor's totals from its first batch on (the run's start-up is not counted
    as starving). Seconds of wall time.

    wait_s: between calls, waiting for the next batch; decode_s: decoding in the actor (on CPU,
    or the batched device decode with decode_on_device); forward_s: inside the backend's
    predict; encode_s: on the encoder thread, which overlaps the next forward; wall_s: from the
    first batch's arrival to the last call's end. images: image rows handled (tar shard markers
    excluded).
    """

    images: int = 0
    calls: int = 0
    first_batch_at: float | None = None  # Unix time the first batch came
    wait_s: float = 0.0
    decode_s: float = 0.0
    forward_s: float = 0.0
    encode_s: float = 0.0
    wall_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Meter:
    """Actor id -> its latest ActorTimes (as a dict); list rows that are no image (tar shards,
    video segments: `containers_listed`), and the marker rows the reader added (`markers`). Run as a
    Ray actor by start_meter."""

    def __init__(self) -> None:
        self.actors: dict[str, dict[str, Any]] = {}
        self.containers_listed = self.markers = 0

    def actor(self, actor_id: str, times: dict[str, Any]) -> None:
        self.actors[actor_id] = times

    def listed(self, containers: int) -> None:
        self.containers_listed += containers

    def read(self, markers: int) -> None:
        self.markers += markers

    def figures(self) -> dict[str, dict[str, Any]]:
        return dict(self.actors)

    def counts(self) -> dict[str, Any]:
        """For the progress line (batchseg.console.count_images_with)."""
        rates = [t["images"] / t["wall_s"] for t in self.actors.values() if t["wall_s"] > 0]
        return {"images": sum(t["images"] for t in self.actors.values()), "markers": self.markers,
                "containers_listed": self.containers_listed, "actors": len(self.actors),
                "images_per_s_per_actor": sum(rates) / len(rates) if rates else None}


def send(meter: Any, method: str, *args: Any) -> None:
    """From a stage: meter.method(*args). Waits for the meter (a millisecond a call), so that
    what the driver reads includes every call that has returned."""
    import ray

    ray.get(getattr(meter, method).remote(*args))


def start_meter() -> Any:
    """The run's meter (driver side), pinned to the driver's node like the journal: on a worker
    node it died with that node and took the listing tasks that report to it down with it. Pass
    its handle to the stages."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(Meter).options(scheduling_strategy=here).remote()
