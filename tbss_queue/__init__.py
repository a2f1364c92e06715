"""tbss-queue: run the registration commands of an FSL TBSS study on many machines."""

from .api import (
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
from .config import Settings
from .errors import TbssQueueError
from .logfiles import CommandLog
from .models import Batch, BatchStatus, NodeInfo, NodeStatus, TaskRecord

__version__ = "0.1.0"

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
