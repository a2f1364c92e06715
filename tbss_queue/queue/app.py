"""The Celery app: the one place where Celery settings live, each with the reason it is set."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.exceptions import ImproperlyConfigured, SecurityError

from tbss_queue.config import Settings
from tbss_queue.errors import ConfigError

TASK_NAME = "tbss_queue.run_command"
# with the redis-py client, unix sockets are unix://; kombu and Celery's backend want redis+socket://
_SOCKET_SCHEMES = ("unix://", "redis+socket://")


def celery_url(url: str) -> str:
    """The URL spelled the way kombu and Celery's Redis backend accept it."""
    if url.startswith("unix://"):
        return "redis+socket://" + url[len("unix://") :]
    return url


def make_app(settings: Settings) -> Celery:
    """A Celery app configured for long, CPU-bound commands that must run exactly once."""
    app = Celery("tbss_queue", set_as_current=False)
    transport: dict[str, Any] = {
        # a message unacknowledged this long is handed out again: must outlive any command
        "visibility_timeout": settings.visibility_timeout,
        # kombu otherwise sweeps for expired unacked messages only every ~100 s
        "unacked_restore_interval": 10,
        "unacked_restore_throttle": 1,
        "health_check_interval": 25,
        # a connection that died without a FIN fails instead of blocking the worker for ever
        "socket_timeout": 15,
        "socket_connect_timeout": 5,
        "socket_keepalive": True,
    }
    backend_transport: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout}
    if settings.uses_sentinel or settings.backend_url.startswith("sentinel://"):
        # kombu's and Celery's own Sentinel support: they ask the Sentinels for this master
        # and reconnect to whichever replica they promote
        sentinel = sentinel_options(settings)
        transport.update(sentinel)
        backend_transport.update(sentinel)
    app.conf.update(
        broker_url=celery_url(settings.broker),
        result_backend=celery_url(settings.backend_url),
        broker_transport_options=transport,
        result_backend_transport_options=backend_transport,
        visibility_timeout=settings.visibility_timeout,
        # ack after the command ended, so a crash hands the task back instead of losing it
        task_acks_late=True,
        # with acks_late, each pool process reserves exactly one task: no hoarding across nodes
        worker_prefetch_multiplier=1,
        # a killed pool process requeues its task (our heartbeats bound the loop: crash limit)
        task_reject_on_worker_lost=True,
        # Deliberately off (Celery's 5.x default). Plain Celery needs it on: a reconnect restores
        # the unacked message and a second worker runs it while the first still does. Here the
        # claim (execution.lease.claimed) drops any copy of a running task, so cancelling
        # would only kill
        # every running registration on each Redis blip, and race with commands that just
        # finished (their outcome unrecorded, they would run again).
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # Outcomes live in tbss-queue's own records (batches.py), which also drop a redelivered
        # copy of a finished task. Celery's result keys would only cost Redis memory (one per
        # command for a week), and waiting on them costs submit a SUBSCRIBE per message.
        task_ignore_result=True,
        task_track_started=True,
        # JSON only on the wire: pickle from whoever can write to Redis is refused
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # Task events only while Flower watches: Flower switches them on in every worker at
        # start and every 5 s after. Always on, their three publishes per command cost a
        # worker's main process a fifth of its throughput for nobody (benchmarks/).
        worker_send_task_events=False,
        # but no `task-sent` event per queued command: 100,000 of them would cut submit to a
        # fifth of its speed and flood Flower; `status` counts what is queued
        task_send_sent_event=False,
        result_expires=7 * 24 * 3600,
        result_extended=True,
        broker_connection_retry_on_startup=True,
        # a study runs for days: keep reconnecting instead of giving up after ~46 min
        broker_connection_max_retries=None,
        task_default_queue=settings.queue,
        task_create_missing_queues=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        task_time_limit=None,
        enable_utc=True,
    )
    ssl_options = settings.ssl_options()
    if ssl_options:
        # as options, not URL parameters, so Flower and every other client get them too
        app.conf.update(broker_use_ssl=ssl_options, redis_backend_use_ssl=ssl_options)
    if settings.signing:
        _sign_messages(app, settings)
    return app


def sentinel_options(settings: Settings) -> dict[str, Any]:
    """kombu's and Celery's Sentinel transport options: the master's name, and how to reach a
    Sentinel (its password; without `sentinel_kwargs` kombu would use the socket options)."""
    sentinel_kwargs: dict[str, Any] = {"socket_timeout": 15, "socket_connect_timeout": 5}
    if settings.sentinel_password:
        sentinel_kwargs["password"] = settings.sentinel_password
    return {"master_name": settings.sentinel_master, "sentinel_kwargs": sentinel_kwargs}


def _sign_messages(app: Celery, settings: Settings) -> None:
    """Celery's `auth` serializer: task, event and control messages are signed with our key
    and only messages signed by a certificate in `sign_store` are accepted; results stay JSON
    (they travel from worker to submitter, in our own Redis records)."""
    app.conf.update(
        security_key=settings.sign_key,
        security_certificate=settings.sign_cert,
        security_cert_store=settings.sign_store,
        security_digest="sha256",
        task_serializer="auth",
        event_serializer="auth",
        accept_content=["auth"],
        result_accept_content=["json"],
    )
    try:
        app.setup_security(allowed_serializers=["json"], serializer="json")
    except (SecurityError, ImproperlyConfigured, ValueError) as exc:
        raise ConfigError(f"--sign-key / --sign-cert / --sign-store: {exc}") from None
