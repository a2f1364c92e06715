"""tbss-queue: run the registration commands of an FSL TBSS study on many machines."""

from .api import (
    cancel,
    failures,
    forget,
    list_batches,
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
from .models import Batch, BatchStatus, NodeInfo, NodeStatus, TaskRecord

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "BatchStatus",
    "NodeInfo",
    "NodeStatus",
    "Settings",
    "TaskRecord",
    "TbssQueueError",
    "__version__",
    "cancel",
    "failures",
    "forget",
    "list_batches",
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
