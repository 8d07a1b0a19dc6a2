"""The Procfile, docker-compose.yml, the Dockerfile and the Makefile agree with each other and the
contract."""

from __future__ import annotations

import re

import yaml

from tests.processes import ROOT

# What the wheel is built from: the Dockerfile's wheel stage and tests/test_package.py.
WHEEL_SOURCES = ("pyproject.toml", "README.md", "config", "workers", "tasks")


def procfile() -> dict[str, str]:
    entries = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, command = line.split(":", 1)
            entries[name.strip()] = command.strip()
    return entries


def compose() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_procfile_has_the_contract_processes() -> None:
    assert {"worker", "beat", "flower"} <= set(procfile())


def test_every_procfile_process_runs_in_compose_with_the_same_command() -> None:
    services = compose()["services"]
    for name, command in procfile().items():
        assert name in services, f"Procfile process {name!r} has no compose service"
        argv = services[name]["command"]
        assert argv[:2] == ["sh", "-c"], name
        # Compose escapes a shell's $ as $$; the command itself must be the Procfile's.
        assert argv[2].replace("$$", "$") == f"exec {command}", name


def test_compose_runs_the_backing_services_with_health_checks() -> None:
    services = compose()["services"]
    assert {"postgres", "redis", "migrate", "worker", "beat", "flower"} <= set(services)
    for name in ("postgres", "redis", *procfile()):
        assert "healthcheck" in services[name], f"{name} has no health check"
    redis_command = services["redis"]["command"]
    assert redis_command[redis_command.index("--appendonly") + 1] == "yes"
    assert services["migrate"]["command"] == ["backstop", "db", "upgrade"]
    for name in procfile():
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["postgres"]["condition"] == "service_healthy"


def test_compose_points_every_process_at_postgres_and_redis() -> None:
    services = compose()["services"]
    for name in (*procfile(), "migrate"):
        env = services[name]["environment"]
        assert env["DATABASE_URL"].startswith("postgresql+psycopg2://")
        assert env["BROKER_URL"].startswith("redis://redis:")


def test_flower_is_only_exposed_behind_basic_auth() -> None:
    flower = compose()["services"]["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")


def test_workers_split_batch_from_the_time_critical_queues() -> None:
    queues = {
        name: set(re.search(r"--queues=(\S+)", cmd).group(1).split(","))
        for name, cmd in procfile().items()
        if "--queues=" in cmd
    }
    assert "critical" in queues["worker"] and "batch" not in queues["worker"]
    assert queues["batch"] == {"batch"}


def test_ci_runs_the_readme_test_command() -> None:
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert "make test" in (ROOT / "README.md").read_text()
    assert "make run" in (ROOT / "README.md").read_text()


def test_the_metrics_exporter_reads_the_workers_volume_and_is_never_published() -> None:
    assert "metrics" in procfile()
    services = compose()["services"]
    assert "ports" not in services["metrics"]
    assert services["metrics"]["volumes"] == services["worker"]["volumes"]


def test_the_readme_describes_every_procfile_process() -> None:
    readme = (ROOT / "README.md").read_text()
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name = line.split(":", 1)[0]
            assert f"| `{name}`" in readme, f"README's process table lacks {name}"


def dockerfile_stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuations joined, comments dropped), per stage."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        stages[-1].append(line)
    return stages


def test_the_image_builds_a_wheel_from_the_sources_alone() -> None:
    first, *_ = dockerfile_stages()
    copied = [src for line in first if line.startswith("COPY ") for src in line.split()[1:-1]]
    assert sorted(copied) == sorted(WHEEL_SOURCES)
    assert any(re.search(r"pip wheel --no-deps\b", line) for line in first)


def test_the_image_installs_the_production_lock_then_the_wheel_non_editable() -> None:
    *_, final = dockerfile_stages()
    text = "\n".join(final)
    assert "requirements/production.txt" in text and "requirements/dev.txt" not in text
    assert re.search(r"pip install --require-hashes --no-deps -r \S*production\.txt", text)
    assert re.search(r"pip install --no-deps \S*\.whl", text)
    assert "pip check" in text
    assert not re.search(r"(^|\s)(-e|--editable)(\s|$)", text)
    for line in final:  # no source tree beside the installed package
        if line.startswith("COPY ") and "--from=" not in line:
            assert not set(line.split()[1:-1]) & {"workers", "config", "tasks", "."}, line


def test_the_image_runs_as_a_non_root_user() -> None:
    *_, final = dockerfile_stages()
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0") and not users[-1].startswith("0:")
    assert any("useradd" in line and users[-1] in line for line in final)


def test_make_install_and_ci_install_from_the_dev_lock() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^LOCK := requirements/dev\.txt$", makefile, re.M)
    stamp = re.search(r"^\$\(STAMP\): (.*)$", makefile, re.M)
    assert stamp and "$(LOCK)" in stamp.group(1).split()  # a new lock reinstalls
    assert "--require-hashes --no-deps -r $(LOCK)" in makefile
    assert "--no-deps -e ." in makefile
    assert re.search(r"^test: install\b", makefile, re.M)
    lock = makefile[makefile.index("\nlock:") :]
    assert "-o requirements/production.txt" in lock and "-o requirements/dev.txt" in lock
