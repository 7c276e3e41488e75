"""The whole flywheel on this machine, on CPU, over sample shapes with known ground truth:

    1. a random-init run (a light Mask R-CNN), and its AP against the ground truth;
    2. a push to a local Label Studio;
    3. a scripted annotator, standing in for a person, submits the ground truth of most images
       through Label Studio's API (the rest stay unreviewed: the loop's held-out images);
    4. `batchseg pull labelstudio`, then `batchseg acceptance` (a random model: close to nothing kept);
    5. `batchseg train` on the reviews (jobs/configs/train-local-shapes.yaml: ResNet-18 FPN, small images);
    6. a run with the new weights (`--model-dir`, `--skip-reviewed`): the unreviewed images only;
    7. AP on the unreviewed images before and after, and renders of the new model's masks.

    make loop        # or: python benchmarks/loop.py [--work out/loop] [--scenes 240] [--iterations 300]

Needs the Label Studio server's own virtualenv (`make labelstudio`). Prints the figures of
every step; each step is the `batchseg` command a person would type (printed before it runs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LABEL_STUDIO = Path(os.environ.get("BATCHSEG_LABEL_STUDIO", REPO / ".venv-labelstudio" / "bin" / "label-studio"))
TOKEN = "batchseg0loop0token000000000000000000001"
ARCH, MIN_SIZE, MAX_SIZE = "maskrcnn_resnet18_fpn", 112, 192
UNREVIEWED = 0.2  # fraction of images nobody reviews (by image_id hash): the loop's held-out set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="out/loop", help="folder for everything (emptied first)")
    parser.add_argument("--scenes", type=int, default=240)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--port", type=int, default=18619)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from batchseg.samples import write_samples

    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    made = write_samples(work / "samples", scenes=args.scenes, seed=7, shard=False)
    images, out, models = work / "samples" / "images" / "shapes", work / "lake", work / "models" / "v2"
    gt = {**made["ground_truth"], "images": [i for i in made["ground_truth"]["images"] if i["file_name"].startswith("shapes/")]}
    label_map = {i: {"id": c["id"], "name": c["name"]} for i, c in enumerate(gt["categories"], start=1)}
    (work / "label_map.json").write_text(json.dumps(label_map))
    reviewed, unreviewed = split_images(gt, images)
    write_gt(gt, unreviewed, work / "gt_unreviewed.json")
    print(f"== {len(gt['images'])} sample images under {images}: {len(reviewed)} to review, {len(unreviewed)} left unreviewed")

    say("1. a random-init run")
    batchseg("run", "--input", images, "--output", out, "--backend", "torchvision", "--model", ARCH, "--random-init",
             "--label-map", work / "label_map.json", "--min-size", MIN_SIZE, "--max-size", MAX_SIZE, "--device", "cpu")
    batchseg("eval", out, "--gt", work / "gt_unreviewed.json", "--out", work / "eval_before.json")

    say("2. push to Label Studio")
    with label_studio(work / "label_studio", args.port) as url:
        env = {"LABEL_STUDIO_API_KEY": TOKEN}
        batchseg("push", "labelstudio", out, "--url", url, "--project", "batchseg loop", env=env)
        say("3. a scripted annotator submits the ground truth")
        submitted = annotate(url, "batchseg loop", gt, reviewed)
        print(f"submitted the ground truth of {submitted} images ({sum(len(a) for _, a in reviewed.values())} instances)")
        say("4. pull, then acceptance")
        batchseg("pull", "labelstudio", out, "--url", url, "--project", "batchseg loop", env=env)
    batchseg("acceptance", out)

    say("5. train on the reviews")
    started = time.monotonic()
    batchseg("train", "--config", REPO / "jobs" / "configs" / "train-local-shapes.yaml", "--data", out, "--output", models,
             "--categories", ",".join(c["name"] for c in gt["categories"]), "--iterations", args.iterations)
    train_s = time.monotonic() - started

    say("6. a run with the new weights, reviewed images left alone")
    batchseg("run", "--input", images, "--output", out, "--model-dir", models, "--skip-reviewed", "--device", "cpu")

    say("7. AP on the unreviewed images, before and after; renders")
    batchseg("eval", out, "--gt", work / "gt_unreviewed.json", "--out", work / "eval_after.json")
    batchseg("render", out, work / "render", "--limit", "12")
    card = json.loads((models / "model_card.json").read_text())
    b, a = (json.loads((work / f"eval_{w}.json").read_text()) for w in ("before", "after"))
    print(f"\n== the loop: unreviewed images ({len(unreviewed)}) segm AP {b['segm']['AP']:.1f} -> {a['segm']['AP']:.1f}, "
          f"AP50 {b['segm']['AP50']:.1f} -> {a['segm']['AP50']:.1f}; training {card['iterations']} iterations in "
          f"{card['train_s']:.0f} s of training ({train_s:.0f} s for the command), "
          f"held-out (reviewed) segm AP50 {card['heldout']['base'].get('segm_AP50', 0):.1f} -> "
          f"{card['heldout']['trained'].get('segm_AP50', 0):.1f}; "
          f"renders: {work / 'render' / 'index.html'}")


def split_images(gt: dict, images: Path) -> tuple[dict[int, list], dict[int, list]]:
    """image_id (the run's, of the image's URI) -> (file_name, its GT annotations), for the
    images to review and those left alone (by the hash of the image_id)."""
    from batchseg.inputs.sources import canonical_uri
    from batchseg.rows.schema import image_id
    from batchseg.train.data import is_heldout

    anns: dict[int, list] = {}
    for a in gt["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    reviewed, unreviewed = {}, {}
    for img in gt["images"]:
        key = image_id(canonical_uri(str(images.parent / img["file_name"])))
        # the top of the hash range: training's own held-out split (the bottom) stays among the reviewed
        side = reviewed if is_heldout(key, 1 - UNREVIEWED) else unreviewed
        side[key] = (img["file_name"], anns.get(img["id"], []))
    return reviewed, unreviewed


def write_gt(gt: dict, keep: dict[int, tuple], path: Path) -> None:
    names = {name for name, _ in keep.values()}
    images = [i for i in gt["images"] if i["file_name"] in names]
    ids = {i["id"] for i in images}
    path.write_text(json.dumps({**gt, "images": images, "annotations": [a for a in gt["annotations"] if a["image_id"] in ids]}))


def annotate(url: str, title: str, gt: dict, reviewed: dict[int, tuple]) -> int:
    """Submit each reviewed image's ground truth as brush regions on its Label Studio task."""
    from label_studio_sdk import LabelStudio

    from batchseg.exports.labelstudio import brush_rle
    from batchseg.rows.encoding import decode_mask

    names = {c["id"]: c["name"] for c in gt["categories"]}
    client = LabelStudio(base_url=url, api_key=TOKEN)
    project = next(p for p in client.projects.list() if p.title == title)
    done = 0
    for task in client.tasks.list(project=project.id, fields="all", page_size=100):
        if int(task.data["image_id"]) not in reviewed:
            continue
        _, anns = reviewed[int(task.data["image_id"])]
        result = []
        for n, a in enumerate(anns):
            mask = decode_mask(a["segmentation"])
            h, w = mask.shape
            result.append({"id": f"gt{n}", "type": "brushlabels", "from_name": "mask", "to_name": "image",
                           "original_width": w, "original_height": h, "image_rotation": 0,
                           "value": {"format": "rle", "rle": brush_rle(mask), "brushlabels": [names[a["category_id"]]]}})
        client.annotations.create(id=task.id, result=result, lead_time=1.0)
        done += 1
    return done


class label_studio:
    """A Label Studio server on 127.0.0.1:PORT with a fresh database (its own virtualenv)."""

    def __init__(self, data: Path, port: int) -> None:
        self.data, self.url = data, f"http://127.0.0.1:{port}"
        self.port = port

    def __enter__(self) -> str:
        self.data.mkdir(parents=True)
        env = {**os.environ, "LATEST_VERSION_CHECK": "false", "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
               "LABEL_STUDIO_BASE_DATA_DIR": str(self.data), "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": ""}
        env.pop("PYTHONPATH", None)
        self.log = open(self.data / "server.log", "wb")
        self.server = subprocess.Popen(
            [str(LABEL_STUDIO), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(self.port),
             "--data-dir", str(self.data), "--username", "loop@example.com", "--password", "batchseg-loop-pw",
             "--user-token", TOKEN], stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=self.data,
            start_new_session=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and self.server.poll() is None:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5):
                    return self.url
            except OSError:
                time.sleep(1)
        raise SystemExit(f"Label Studio did not start (log: {self.data / 'server.log'})")

    def __exit__(self, *exc) -> None:
        os.killpg(self.server.pid, signal.SIGTERM)
        self.server.wait(60)
        self.log.close()


def say(step: str) -> None:
    print(f"\n== {step}", flush=True)


def batchseg(*args, env: dict[str, str] | None = None) -> str:
    cmd = ["batchseg", *map(str, args)]
    print("$ " + " ".join(cmd), flush=True)
    done = subprocess.run([sys.executable, "-m", "batchseg", *cmd[1:]], cwd=REPO, text=True, stdout=subprocess.PIPE,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    print(done.stdout, end="", flush=True)
    if done.returncode != 0:
        raise SystemExit(f"step failed (exit {done.returncode}): {' '.join(cmd)}")
    return done.stdout


if __name__ == "__main__":
    main()
