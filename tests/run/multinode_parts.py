"""Parts the multi-node tests load by name on the cluster's workers: a slow oracle (so a node
can be killed mid-run) and an actor that holds CPUs (so a shape can be made that cannot run)."""

from __future__ import annotations

import sys
import time

from tests.oracle import ColorKeyBackend

SECONDS_PER_IMAGE = 0.4


class SlowColorKey(ColorKeyBackend):
    """The colour-key oracle, SECONDS_PER_IMAGE slower per image: a run lasts long enough to
    lose a node in the middle of it."""

    seconds_per_image = SECONDS_PER_IMAGE

    def predict(self, images):
        time.sleep(self.seconds_per_image * len(images))
        return super().predict(images)


class SlowerColorKey(SlowColorKey):
    """A second each image: one actor's run lasts long enough for a node to join and be used."""

    seconds_per_image = 1.0


def hold_cpus(address: str, cpus: int) -> None:
    """Run as a script: connect, start `cpus` detached actors holding one CPU each (as another
    job's work would), wait until they run, and exit; they stay until released."""
    import ray

    @ray.remote
    class Holder:
        def ready(self) -> bool:
            return True

    ray.init(address=address, namespace="blockers", log_to_driver=False)
    holders = [Holder.options(name=f"holder-{i}", lifetime="detached", num_cpus=1).remote() for i in range(cpus)]
    ray.get([h.ready.remote() for h in holders], timeout=60)


def release(address: str, cpus: int) -> None:
    import ray

    ray.init(address=address, namespace="blockers", log_to_driver=False)
    for i in range(cpus):
        ray.kill(ray.get_actor(f"holder-{i}"))


if __name__ == "__main__":
    (hold_cpus if sys.argv[1] == "hold" else release)(sys.argv[2], int(sys.argv[3]))
