"""tbss-queue: run the registration commands of an FSL TBSS study on many machines."""

from tbss_queue.api import (
    cancel,
    failures,
    forget,
    joblog,
    list_batches,
    logs,
    matrix,
    nodes,
    report,
    resume_node,
    retry,
    status,
    submit,
    tasks,
    wait,
)
from tbss_queue.config import Settings
from tbss_queue.errors import TbssQueueError
from tbss_queue.models import Batch, BatchStatus, NodeInfo, NodeStatus, TaskRecord
from tbss_queue.version import __version__
from tbss_queue.views.logfiles import CommandLog

__all__ = [
    "Batch",
    "BatchStatus",
    "CommandLog",
    "NodeInfo",
    "NodeStatus",
    "Settings",
    "TaskRecord",
    "TbssQueueError",
    "__version__",
    "cancel",
    "failures",
    "forget",
    "joblog",
    "list_batches",
    "logs",
    "matrix",
    "nodes",
    "report",
    "resume_node",
    "retry",
    "status",
    "submit",
    "tasks",
    "wait",
]
