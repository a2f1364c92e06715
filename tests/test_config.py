"""Settings resolve once: explicit values > TBSS_QUEUE_* environment > defaults."""

from __future__ import annotations

import os

import pytest

from tbss_queue.config import DEFAULT_BROKER, Settings, mask_url, parse_sentinel_url
from tbss_queue.errors import ConfigError
from tbss_queue.queue.app import make_app

from .conftest import tbss_queue


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


@pytest.mark.parametrize(
    ("query", "turns_off"),
    [
        ("ssl_cert_reqs=none", "certificate checks"),
        ("ssl_cert_reqs=optional", "certificate checks"),
        ("ssl_cert_reqs=CERT_NONE", "certificate checks"),
        ("ssl_cert_reqs=Cert_Optional", "certificate checks"),
        ("ssl_cert_reqs=required&ssl_cert_reqs=none", "certificate checks"),
        ("ssl_check_hostname=false", "host name checks"),
        ("ssl_check_hostname=0", "host name checks"),
        ("ssl_check_hostname=NO", "host name checks"),
    ],
)
def test_url_query_that_turns_tls_checks_off_is_refused(query: str, turns_off: str) -> None:
    name = query.rsplit("&", 1)[-1].split("=")[0]
    url = f"rediss://:hunter2@h:6380/0?{query}"
    with pytest.raises(ConfigError) as info:
        Settings.resolve(env={}, broker=url)
    assert str(info.value) == (
        f"--broker / TBSS_QUEUE_BROKER: 'rediss://:***@h:6380/0?{query}' turns {turns_off} off: "
        f"remove {name} from the URL, or give --tls-insecure (testing only)"
    )
    # the result backend's URL too; --tls-insecure (testing only) lets both through
    with pytest.raises(ConfigError, match="^--result-backend / TBSS_QUEUE_RESULT_BACKEND: "):
        Settings.resolve(env={}, broker="rediss://h:6380/0", result_backend=url)
    assert Settings.resolve(env={}, broker=url, tls_insecure=True).tls_insecure


@pytest.mark.parametrize(
    ("parameter", "option"),
    [
        ("ssl_ca_certs", "--tls-ca"),
        ("ssl_ca_path", "--tls-ca"),
        ("ssl_certfile", "--tls-cert"),
        ("ssl_keyfile", "--tls-key"),
    ],
)
def test_certificate_files_in_the_url_are_refused_in_favour_of_the_options(
    parameter: str, option: str
) -> None:
    env = {"TBSS_QUEUE_BROKER": f"rediss://:hunter2@h:6380/0?{parameter}=/etc/x.pem"}
    with pytest.raises(ConfigError) as info:
        Settings.resolve(env=env)
    message = str(info.value)
    assert message.startswith("--broker / TBSS_QUEUE_BROKER: 'rediss://:***@h:6380/0?")
    assert f"sets {parameter} in the URL" in message and f"give {option} instead" in message
    assert "hunter2" not in message and "\n" not in message


def test_url_query_restating_the_default_checks_is_accepted() -> None:
    url = "rediss://h:6380/0?ssl_cert_reqs=required&ssl_check_hostname=true"
    assert Settings.resolve(env={}, broker=url).broker == url
    assert Settings.resolve(env={}, broker="rediss://h/0?ssl_cert_reqs=CERT_REQUIRED")


def test_non_numeric_port_is_a_one_line_config_error() -> None:
    for url in ("redis://host:notaport/0", "redis://:hunter2@host:notaport/0"):
        with pytest.raises(ConfigError) as info:
            Settings.resolve(env={}, broker=url)
        assert str(info.value) == (
            f"--broker / TBSS_QUEUE_BROKER: {mask_url(url)!r}: "
            "the port is not a number from 1 to 65535"
        )
        assert "hunter2" not in str(info.value)
    with pytest.raises(ConfigError, match="^--result-backend / TBSS_QUEUE_RESULT_BACKEND: "):
        Settings.resolve(env={}, result_backend="redis://h:99999/1")


def test_non_numeric_port_exits_2_without_a_traceback() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TBSS_QUEUE_")}
    res = tbss_queue("status", "--broker", "redis://:hunter2@host:notaport/0", env=env)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [
        "tbss-queue: error: --broker / TBSS_QUEUE_BROKER: 'redis://:***@host:notaport/0': "
        "the port is not a number from 1 to 65535"
    ]


def test_mask_url_hides_query_passwords_and_survives_a_bad_port() -> None:
    assert mask_url("redis+socket:///r/redis.sock?password=s3cret&db=1") == (
        "redis+socket:///r/redis.sock?password=***&db=1"
    )
    assert mask_url("redis://:s3cret@h:notaport/0") == "redis://:***@h:notaport/0"


def test_sentinel_url_master_name_and_password_resolve_once() -> None:
    url = "sentinel://:s3cret@s1:26379/2;sentinel://s2:26380;sentinel://s3"
    secret = os.urandom(4).hex()
    env = {"TBSS_QUEUE_BROKER": url, "TBSS_QUEUE_SENTINEL_PASSWORD": secret}
    s = Settings.resolve(env=env)
    assert s.uses_sentinel and s.sentinel_master == "mymaster" and s.sentinel_password == secret
    assert Settings.resolve(env={**env, "TBSS_QUEUE_SENTINEL_MASTER": "lab"}).sentinel_master == (
        "lab"
    )
    assert Settings.resolve(
        env={**env, "TBSS_QUEUE_SENTINEL_MASTER": "lab"}, sentinel_master="cli"
    ).sentinel_master == ("cli")
    parsed = parse_sentinel_url("--broker", url)
    assert parsed.sentinels == (("s1", 26379), ("s2", 26380), ("s3", 26379))
    assert (parsed.db, parsed.password) == (2, "s3cret")
    assert s.display_broker == "sentinel://:***@s1:26379/2;sentinel://s2:26380;sentinel://s3"


def test_sentinel_settings_reach_kombu_and_celerys_backend() -> None:
    secret = os.urandom(4).hex()
    app = make_app(
        Settings.resolve(env={}, broker="sentinel://s1:26379/0", sentinel_password=secret)
    )
    for options in (
        app.conf.broker_transport_options,
        app.conf.result_backend_transport_options,
    ):
        assert options["master_name"] == "mymaster"
        assert options["sentinel_kwargs"]["password"] == secret
    assert app.conf.broker_url == "sentinel://s1:26379/0"


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (
            {"broker": "sentinel://:pw@a:1;sentinel://:pw2@b:notaport"},
            "'sentinel://:***@a:1;sentinel://:***@b:notaport': a port is not a number",
        ),
        ({"broker": "sentinel://a:1;rediss://b:2"}, "each part must be sentinel://HOST:PORT"),
        ({"broker": "sentinel://a:1/x"}, "the database 'x' is not a number"),
        ({"broker": "sentinel://a:1?ssl_cert_reqs=none"}, "URL parameters are not read"),
        ({"broker": "sentinel://a:1", "tls_insecure": True}, "TLS is not supported"),
        ({"broker": "sentinel://a:1", "sentinel_master": "my master"}, "is not a master name"),
        ({"sentinel_password": "x"}, "is not a sentinel:// URL"),
    ],
)
def test_bad_sentinel_settings_are_one_line_errors(given: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.resolve(env={}, **given)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert "pw2" not in str(info.value)
