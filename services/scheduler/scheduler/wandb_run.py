"""Log one experiment to W&B with its SDK: the child process scheduler/tracking.py starts.

Reads the run as JSON on stdin; WANDB_MODE, WANDB_DIR, WANDB_API_KEY (and WANDB_BASE_URL) come
from the environment the parent builds. The run id is our job id and a second export resumes
it (``resume="allow"``): W&B keeps one run per experiment. An online run's local folder is
removed once W&B has it. Prints the answer, one JSON line after ``WANDB_ANSWER_PREFIX``, last.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import wandb

from scheduler.tracking import WANDB_ANSWER_PREFIX


def main() -> None:
    run_spec = json.load(sys.stdin)
    run = wandb.init(
        project=run_spec["project"],
        entity=run_spec["entity"] or None,
        id=run_spec["job_id"],
        name=run_spec["name"],
        tags=run_spec["tags"] or None,
        notes=run_spec["note"] or None,
        config={**run_spec["params"], "links": run_spec["links"]},
        resume="allow",
        settings=wandb.Settings(silent=True, x_disable_stats=True, save_code=False),
    )
    for step, loss, learning_rate in run_spec["loss"]:
        run.log({"train/loss": loss, "train/learning_rate": learning_rate}, step=step)
    run.summary.update(run_spec["metrics"])
    answer = {"run_id": run.id, "url": run.url or "", "dir": run.dir}
    online = not run.offline
    run.finish()
    if online:  # the run is on W&B now; its local copy would only fill the scheduler's disk
        shutil.rmtree(os.path.dirname(run.dir), ignore_errors=True)
    sys.stdout.write(WANDB_ANSWER_PREFIX + json.dumps(answer) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
