"""Settings resolve once: explicit values > TBSS_QUEUE_* environment > defaults."""

from __future__ import annotations

import pytest

from tbss_queue.config import DEFAULT_BROKER, Settings, mask_url
from tbss_queue.errors import ConfigError


def test_defaults_then_environment_then_explicit() -> None:
    assert Settings.resolve(env={}).broker == DEFAULT_BROKER
    env = {"TBSS_QUEUE_BROKER": "redis://env:6379/1", "TBSS_QUEUE_HEARTBEAT": "2.5"}
    s = Settings.resolve(env=env)
    assert s.broker == "redis://env:6379/1" and s.heartbeat == 2.5 and s.broker_explicit
    s = Settings.resolve(env=env, broker="redis://cli:6379/2")
    assert s.broker == "redis://cli:6379/2"
    assert not Settings.resolve(env={}).broker_explicit


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="TBSS_QUEUE_HEARTBEAT='often' is not a number"):
        Settings.resolve(env={"TBSS_QUEUE_HEARTBEAT": "often"})


def test_visibility_timeout_must_outlive_the_time_limit() -> None:
    with pytest.raises(ConfigError, match="VISIBILITY_TIMEOUT"):
        Settings.resolve(env={}, time_limit=7200, visibility_timeout=3600)


def test_non_redis_broker_is_refused_without_leaking_the_password() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.resolve(env={}, broker="amqp://u:hunter2@host//")
    assert "hunter2" not in str(info.value) and "--broker" in str(info.value)


def test_mask_url() -> None:
    assert mask_url("redis://:s3cret@h:6379/0") == "redis://:***@h:6379/0"
    assert mask_url("rediss://user:s3cret@h/0") == "rediss://user:***@h/0"
    assert mask_url("redis://h:6379/0") == "redis://h:6379/0"
