"""Memory stays flat however many task ids pass: the tracker fed N distinct task ids in-process.

Half of the tasks never finish (a worker died holding them), so the in-flight table fills to
--max-tracked-tasks and then evicts (and counts) the oldest. RSS is printed every tenth of the
run; it must stop growing once the tables are full.

    python bench/memory.py --ids 1000000
"""

from __future__ import annotations

import argparse
import time
import uuid
from pathlib import Path

from celery_obs.exporter.config import Limits
from celery_obs.exporter.tracker import Tracker


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ids", type=int, default=1_000_000)
    parser.add_argument("--names", type=int, default=50)
    parser.add_argument("--max-tracked-tasks", type=int, default=Limits().max_tracked_tasks)
    args = parser.parse_args()
    tracker = Tracker(Limits(max_tracked_tasks=args.max_tracked_tasks))
    now = time.time()
    print(f"start: RSS {rss_mb():.0f} MB")
    step = args.ids // 10
    for i in range(args.ids):
        task_id = str(uuid.uuid4())
        name = f"bench.tasks.task_{i % args.names}"
        tracker.handle(
            {
                "type": "task-sent",
                "uuid": task_id,
                "name": name,
                "queue": "celery",
                "retries": 0,
                "timestamp": now,
            }
        )
        tracker.handle(
            {
                "type": "task-received",
                "uuid": task_id,
                "name": name,
                "retries": 0,
                "timestamp": now,
                "hostname": "w@h",
            }
        )
        tracker.handle(
            {"type": "task-started", "uuid": task_id, "timestamp": now, "hostname": "w@h"}
        )
        if i % 2:
            tracker.handle(
                {
                    "type": "task-succeeded",
                    "uuid": task_id,
                    "runtime": 0.01,
                    "timestamp": now,
                    "hostname": "w@h",
                }
            )
        if (i + 1) % step == 0:
            tasks = tracker.tasks
            print(
                f"{i + 1:>9,} ids: RSS {rss_mb():6.1f} MB, in flight {len(tasks.inflight):,}, "
                f"finished {len(tasks.finished):,}, evicted {tracker.stats.tasks_evicted:,}"
            )


if __name__ == "__main__":
    main()
