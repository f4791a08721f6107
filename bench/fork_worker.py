"""RQ's classic fork-per-job worker with the model preloaded in the parent, for bench/worker_modes.py only.

Settings come from STEELSIGHT_* variables, as for `steelsight worker`.
"""

from rq import Queue, Worker
from rq.serializers import JSONSerializer

from steelsight.clients import redis_client
from steelsight.contract import get_settings
from steelsight.worker import jobs
from steelsight.worker.service import build_engine

if __name__ == "__main__":
    settings = get_settings()
    jobs.install(build_engine(settings), settings)  # loaded once; each forked horse inherits it
    connection = redis_client(settings)
    queue = Queue(settings.queue_name, connection=connection, serializer=JSONSerializer)
    Worker([queue], connection=connection, serializer=JSONSerializer, job_class=jobs.FrameJob).work(burst=True)
