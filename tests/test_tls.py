"""TLS to Redis and signed messages: the right certificates work, every other one is refused."""

from __future__ import annotations

import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tbss_queue import api
from tbss_queue.config import Settings
from tbss_queue.errors import EmbeddedRedisError
from tbss_queue.redis_server import RedisServer, TlsFiles, find_redis_server, free_port

from .certs import Authority, Pair, self_signed
from .conftest import Worker, settings_env, tbss_queue, write_commands
from .test_flower import flower, wait_for, workers_seen
from .test_reliability import job, wait_until


def tls_redis_servers() -> list[str]:
    """redis-server executables to try: only some are built with TLS (Debian's is)."""
    found = [find_redis_server(), "/usr/bin/redis-server"]
    return [exe for exe in dict.fromkeys(found) if shutil.which(exe)]


class TlsBroker:
    def __init__(self, directory: Path) -> None:
        self.ca = Authority(directory / "ca")
        self.client = self.ca.issue("client")
        server = self.ca.issue("redis", server=True)
        self.files = TlsFiles(str(self.ca.pair.cert), str(server.cert), str(server.key))
        self.server: RedisServer | None = None
        errors = []
        for exe in tls_redis_servers():
            try:
                self.server = RedisServer(
                    directory / "data",
                    port=free_port(),
                    persistent=False,
                    tls=self.files,
                    executable=exe,
                ).start()
                break
            except EmbeddedRedisError as exc:
                errors.append(f"{exe}: {exc}")
        if self.server is None:
            pytest.fail("no redis-server with TLS support: " + "; ".join(errors))

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    def env(self, client: Pair | None = None, ca: Path | None = None) -> dict[str, str]:
        client = client or self.client
        return {
            "TBSS_QUEUE_BROKER": self.url,
            "TBSS_QUEUE_TLS_CA": str(ca or self.ca.pair.cert),
            "TBSS_QUEUE_TLS_CERT": str(client.cert),
            "TBSS_QUEUE_TLS_KEY": str(client.key),
        }


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[TlsBroker]:
    broker = TlsBroker(tmp_path / "tls")
    yield broker
    if broker.server:
        broker.server.stop()


def test_tls_broker_with_and_without_the_right_certificates(
    tmp_path: Path,
    tls_broker: TlsBroker,
    workers: Callable[..., Worker],
    settings: Settings,
    run_tag: str,
) -> None:
    base = settings_env(settings, run_tag)
    good = {**base, **tls_broker.env()}
    cmds = write_commands(tmp_path / "c", ["touch out1", "touch out2"])
    # right certificates: worker, submit --wait and status all work over TLS
    workers("w1", 2, env=tls_broker.env())
    res = tbss_queue("submit", str(cmds), "--wait", env=good)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out1").exists() and (tmp_path / "out2").exists()
    res = tbss_queue("status", "--json", env=good)
    assert res.returncode == 0 and '"succeeded": 2' in res.stdout, res.stderr
    # the same, with the certificates given as options instead of the environment
    res = tbss_queue(
        "status",
        "--broker",
        tls_broker.url,
        "--tls-ca",
        str(tls_broker.ca.pair.cert),
        "--tls-cert",
        str(tls_broker.client.cert),
        "--tls-key",
        str(tls_broker.client.key),
        env=base,
    )
    assert res.returncode == 0, res.stderr
    # wrong CA, a client certificate from another CA, no CA at all (system CAs), no client
    # certificate: each is refused in one line, exit 3, for every command
    rogue = Authority(tmp_path / "rogue", "rogue CA")
    wrong = {
        "untrusted server": {**good, "TBSS_QUEUE_TLS_CA": str(rogue.pair.cert)},
        "client of another CA": {**good, **tls_broker.env(client=rogue.issue("intruder"))},
        "system CAs only": {k: v for k, v in good.items() if k != "TBSS_QUEUE_TLS_CA"},
        "no client certificate": {
            k: v for k, v in good.items() if k not in ("TBSS_QUEUE_TLS_CERT", "TBSS_QUEUE_TLS_KEY")
        },
    }
    for case, env in wrong.items():
        for args in (["submit", str(cmds)], ["status"], ["worker"]):
            res = tbss_queue(*args, env=env, timeout=60)
            assert res.returncode == 3, (case, args, res.stdout, res.stderr)
            [line] = res.stderr.strip().splitlines()
            assert line.startswith(f"tbss-queue: error: cannot reach broker {tls_broker.url}")
            if case in ("untrusted server", "system CAs only"):
                assert "certificate verify failed" in line, line
    # --tls-insecure skips verification, says so, and still needs the client certificate
    insecure = {**wrong["untrusted server"], "TBSS_QUEUE_TLS_INSECURE": "1"}
    res = tbss_queue("status", env=insecure)
    assert res.returncode == 0, res.stderr
    assert "not verified" in res.stderr
    # Flower gets the same options (as broker_use_ssl): it sees the worker through TLS
    with flower(good, tmp_path) as base:
        wait_for(lambda: workers_seen(base) == {"w1"}, "Flower to see w1 through TLS")


def test_tls_options_are_checked_before_connecting(tmp_path: Path) -> None:
    res = tbss_queue("status", "--broker", "redis://127.0.0.1:1/0", "--tls-ca", "/etc/hostname")
    assert res.returncode == 2 and "not a rediss:// URL" in res.stderr
    res = tbss_queue("status", "--broker", "rediss://127.0.0.1:1/0", "--tls-ca", "/nonexistent")
    assert res.returncode == 2
    assert res.stderr.strip() == ("tbss-queue: error: --tls-ca /nonexistent: no such readable file")


def test_tls_reaches_celery_as_options_not_url_parameters(tmp_path: Path) -> None:
    ca = Authority(tmp_path)
    settings = Settings.resolve(env={}, broker="rediss://h:1/0", tls_ca=str(ca.pair.cert))
    from tbss_queue.queue.app import make_app

    conf = make_app(settings).conf
    assert conf.broker_use_ssl["ssl_ca_certs"] == str(ca.pair.cert)
    assert conf.broker_use_ssl["ssl_cert_reqs"] == 2  # ssl.CERT_REQUIRED
    assert conf.redis_backend_use_ssl == conf.broker_use_ssl
    assert "ssl" not in conf.broker_url


def test_signed_messages_only(
    tmp_path: Path, workers: Callable[..., Worker], settings: Settings, run_tag: str
) -> None:
    # Given a lab signer whose certificate is in the workers' store, and an outsider's key
    store = tmp_path / "trusted"
    lab = self_signed(tmp_path / "keys", "lab")
    outsider = self_signed(tmp_path / "keys", "outsider")
    store.mkdir()
    shutil.copy(lab.cert, store / "lab.crt")

    def signer(pair: Pair) -> dict[str, str]:
        return {
            "TBSS_QUEUE_SIGN_KEY": str(pair.key),
            "TBSS_QUEUE_SIGN_CERT": str(pair.cert),
            "TBSS_QUEUE_SIGN_STORE": str(store),
        }

    base = settings_env(settings, run_tag)
    lab_env = {**base, **signer(lab)}
    w1 = workers("w1", 1, env=signer(lab))
    # When the lab submits a command, and w1 is SIGKILLed while running it
    log = tmp_path / "log"
    signed = write_commands(tmp_path / "signed", [job("signed", log, "--sleep", "3")])
    res = tbss_queue("submit", str(signed), env=lab_env)
    assert res.returncode == 0, res.stderr
    wait_until(lambda: api.status(settings=settings).running == 1, what="the command running")
    w1.signal(signal.SIGKILL)
    # Then w2 runs it from the lab's own signed message, which recovery sent again
    w2 = workers("w2", 2, env=signer(lab))
    assert api.wait(settings=settings, timeout=60).succeeded == 1
    assert "signed" in log.read_text()
    # When an unsigned client and the outsider submit, nothing runs: the worker refuses their
    # messages and fails those commands as `refused`, saying why (not left queued for ever)
    ids = {}
    for name, env in (("unsigned", base), ("outsider", {**base, **signer(outsider)})):
        cmds = write_commands(tmp_path / name, [f"touch canary_{name}"])
        res = tbss_queue("submit", str(cmds), env=env)
        assert res.returncode == 0, res.stderr
        ids[name] = res.stdout.strip()
    for name, batch_id in ids.items():
        final = api.wait(batch_id, settings=settings, timeout=60)
        assert (final.failed, final.queued, final.succeeded) == (1, 0, 0), name
        [refused] = api.failures(batch_id, settings=settings)
        assert refused.cause == "refused", refused
        assert "not signed by a trusted key" in refused.message, refused.message
    assert "untrusted content of type json" in w2.log.read_text()  # the unsigned message
    assert not list(tmp_path.glob("canary_*"))
