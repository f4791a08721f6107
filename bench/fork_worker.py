"""RQ's classic fork-per-job worker with the model preloaded in the parent: one of bench.worker_modes' modes.

    python -m bench.fork_worker          # as bench.worker_modes runs it, settings from STEELSIGHT_* variables

Settings come from STEELSIGHT_* variables, as for ``steelsight worker``. The parent
loads the model once (``worker.jobs.plain_engine``) and drains the queue in burst mode;
each job runs in a forked horse that inherits the loaded engine. It prints no table
and saves no result: ``python -m bench.worker_modes`` times it.
"""

from __future__ import annotations

import argparse

from rq import Queue, Worker
from rq.serializers import JSONSerializer

from steelsight.clients import redis_client
from steelsight.contract import get_settings
from steelsight.worker import jobs
from steelsight.worker.rq_compat import FrameJob


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    settings = get_settings()
    jobs.plain_engine()  # loaded once here; each forked horse inherits it
    connection = redis_client(settings)
    job_class = FrameJob.bound(settings)
    queue = Queue(settings.queue_name, connection=connection, serializer=JSONSerializer, job_class=job_class)
    Worker([queue], connection=connection, serializer=JSONSerializer, job_class=job_class).work(burst=True)


if __name__ == "__main__":
    main()
