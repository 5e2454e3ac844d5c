"""The container image, built from the Dockerfile and run, as an operator would (podman, Debian's runc).

Docker Hub is out of reach here, so the Dockerfile's one outside image, ``debian:bookworm-slim``, is
stood in for by a local one made with Debian's mmdebstrap (minbase, with the slim image's dpkg
excludes) and tagged with exactly that name; it stays in podman's storage, so a second run skips it.
pip inside the build reaches the package index with this machine's pip configuration and CA bundle,
handed to the build as secrets (mounted for that one step, never in a layer). The build uses
``--format docker``: the OCI format has no HEALTHCHECK.

Slow (on a clean machine about two minutes for the stand-in and the image, half a minute for the
runs); as root (scripts/test.sh installs podman, mmdebstrap and runc) or with CI set, a missing piece
fails the test.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import pytest
import yaml

from amid.simulator import AMISimulator

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO_ROOT = Path(__file__).resolve().parent.parent
BASE_IMAGE = "docker.io/library/debian:bookworm-slim"  # the Dockerfile's `FROM debian:bookworm-slim`
IMAGE = "localhost/amid-test:latest"
UID = 10001
# The sandboxes this runs in refuse to raise RLIMIT_NPROC/NOFILE inside a container to podman's
# defaults; values below the host's limits always work.
ULIMITS = ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]
# The slim image keeps no documentation, manual pages or translations; neither does its stand-in.
SLIM_DPKG_EXCLUDES = [
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/lintian/*",
]


def need(tool: str) -> str:
    found = shutil.which(tool)
    if found is None:
        message = f"{tool} is not installed (scripts/test.sh installs it as root)"
        if os.environ.get("CI") or os.geteuid() == 0:
            pytest.fail(message)
        pytest.skip(message)
    return found


def run(*command: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {result.returncode}:\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def host_pip_settings() -> tuple[str, Path | None]:
    """A pip.conf with this machine's index settings (`pip config list`, environment included), its CA bundle
    pointed at the secret mounted in the build, and the CA bundle itself (None: pip's own)."""
    listed = run(sys.executable, "-m", "pip", "config", "list").stdout
    settings: dict[str, str] = {}
    for line in listed.splitlines():
        match = re.fullmatch(r"[^.]*\.([\w-]+)='(.*)'", line.strip())
        if match:
            settings[match.group(1)] = match.group(2)
    ca = settings.get("cert") or os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE")
    lines = ["[global]"]
    for key in (
        "index-url",
        "extra-index-url",
        "trusted-host",
        "proxy",
        "timeout",
        "default-timeout",
        "retries",
    ):
        value = settings.get(key)
        if key.endswith("index-url") and value:
            # Local file:// indexes of this machine do not exist in the build.
            value = " ".join(url for url in value.split() if url.startswith(("http://", "https://")))
        if value:
            lines.append(f"{key.replace('default-timeout', 'timeout')} = {value}")
    if ca:
        lines.append("cert = /run/secrets/pip-ca.pem")
    return "\n".join(lines) + "\n", Path(ca) if ca else None


def build_stand_in_base(workdir: Path) -> None:
    """Debian 12 minbase with the slim image's dpkg excludes, as `debian:bookworm-slim`."""
    tarball = workdir / "bookworm-slim.tar"
    hooks = "/usr/share/mmdebstrap/hooks/merged-usr"
    run(
        need("mmdebstrap"),
        "--quiet",
        "--variant=minbase",
        *([f"--hook-dir={hooks}"] if Path(hooks).is_dir() else []),
        *(f"--dpkgopt={option}" for option in SLIM_DPKG_EXCLUDES),
        "bookworm",
        str(tarball),
        timeout=600,
    )
    run("podman", "import", "--quiet", str(tarball), BASE_IMAGE, timeout=300)
    tarball.unlink()


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    if os.geteuid() != 0 and not os.environ.get("CI"):
        pytest.skip("the container test runs as root (rootless podman needs subordinate ids set up)")
    need("podman")
    need("runc")
    workdir = tmp_path_factory.mktemp("image")
    if run("podman", "image", "exists", BASE_IMAGE, check=False).returncode != 0:
        build_stand_in_base(workdir)
    pip_conf, ca = host_pip_settings()
    (workdir / "pip.conf").write_text(pip_conf)
    secrets = ["--secret", f"id=pip.conf,src={workdir / 'pip.conf'}"]
    if ca is not None:
        secrets += ["--secret", f"id=pip-ca.pem,src={ca}"]
    run(
        "podman",
        "build",
        "--format",
        "docker",
        "--pull=never",
        *ULIMITS,
        *secrets,
        "--tag",
        IMAGE,
        "--file",
        str(REPO_ROOT / "Dockerfile"),
        str(REPO_ROOT),
        timeout=900,
    )
    [inspected] = json.loads(run("podman", "image", "inspect", IMAGE).stdout)
    yield inspected


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Container:
    """One `podman run -d` of the image, on the host's network (the simulator listens on the host's
    loopback)."""

    def __init__(self, *args: str) -> None:
        self.name = f"amid-test-{uuid.uuid4().hex[:8]}"
        self.volume = f"{self.name}-state"
        self.args = args

    def __enter__(self) -> Self:
        run("podman", "volume", "create", self.volume)
        run(
            "podman",
            "run",
            "--detach",
            "--name",
            self.name,
            "--network",
            "host",
            "--read-only",
            *ULIMITS,
            "--volume",
            f"{self.volume}:/var/lib/amid",
            *self.args,
            IMAGE,
        )
        return self

    def __exit__(self, *exc_info: object) -> None:
        run("podman", "rm", "--force", "--time", "0", self.name, check=False)
        run("podman", "volume", "rm", "--force", self.volume, check=False)

    def state_dir(self) -> Path:
        return Path(
            run("podman", "volume", "inspect", "--format", "{{.Mountpoint}}", self.volume).stdout.strip()
        )

    def logs(self) -> str:
        result = run("podman", "logs", self.name, check=False)
        return result.stdout[-4000:] + result.stderr[-4000:]

    def inspect(self, template: str) -> str:
        return run("podman", "inspect", "--format", template, self.name).stdout.strip()

    async def healthcheck(self) -> int:
        """Run the image's HEALTHCHECK once (podman has no timer for it without systemd); its exit status."""
        result = await asyncio.to_thread(run, "podman", "healthcheck", "run", self.name, check=False)
        return result.returncode

    async def wait_health(self, status: str, timeout: float = 90) -> None:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    code = await self.healthcheck()
                    if self.inspect("{{.State.Health.Status}}") == status and (code == 0) == (
                        status == "healthy"
                    ):
                        return
                    await asyncio.sleep(0.5)
        except TimeoutError:
            raise AssertionError(
                f"never {status}: {self.inspect('{{json .State.Health}}')}\n{self.logs()}"
            ) from None

    async def wait_records(
        self, path: Path, sim: AMISimulator, at_least: int, timeout: float = 60
    ) -> list[dict]:
        """The file's records once it holds every event the simulator sent (at least ``at_least``)."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    sent = sim.stats.events_sent
                    lines = path.read_bytes().splitlines() if path.exists() else []
                    if sent >= at_least and len(lines) >= sent:
                        return [json.loads(line) for line in lines]
                    await asyncio.sleep(0.2)
        except TimeoutError:
            raise AssertionError(
                f"{path} never held the {sim.stats.events_sent} events sent\n{self.logs()}"
            ) from None

    async def stop(self) -> int:
        """`podman stop` (SIGTERM, then SIGKILL after 30 s); amid's exit status."""
        await asyncio.to_thread(run, "podman", "stop", "--time", "30", self.name, timeout=60)
        return int(self.inspect("{{.State.ExitCode}}"))


def http_status(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status


def secret_file(tmp_path: Path) -> Path:
    """The AMI secret as the README says to hand it to the container: owned by uid 10001, mode 0400."""
    path = tmp_path / "ami-secret"
    path.write_text("amidsecret\n")
    os.chown(path, UID, UID)
    path.chmod(0o400)
    return path


def assert_every_event(records: list[dict], sent: int) -> None:
    events = [record for record in records if record["event"] != "AmidGap"]
    assert len(events) == sent
    assert [record["seq"] for record in events] == list(
        range(1, sent + 1)
    )  # one connection: no hole, no duplicate


def test_image_is_small_non_root_and_holds_no_compiler_pip_or_build_secret(image: dict) -> None:
    config = image["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert "docker" in image["ManifestType"]  # --format docker: the OCI format has no HEALTHCHECK
    assert image["Healthcheck"]["Test"] == ["CMD", "amid", "healthcheck"]
    assert config["Entrypoint"] == ["amid"] and config["StopSignal"] == "SIGTERM"
    probe = run(
        "podman",
        "run",
        "--rm",
        "--read-only",
        *ULIMITS,
        "--entrypoint",
        "sh",
        IMAGE,
        "-c",
        "id -u; amid --version; for tool in gcc cc pip pip3; do command -v $tool; done;"
        " python3 -m pip --version 2>/dev/null; ls /run/secrets /etc/pip.conf 2>/dev/null; true",
    ).stdout
    uid, version, *rest = probe.splitlines()
    assert uid == str(UID)
    assert "(read path: C accelerator)" in version, version  # the accelerator was built and works
    assert rest == [], rest  # no compiler, no pip, no trace of the build's secrets
    size_mb = image["Size"] / 1e6
    assert size_mb < 200, size_mb


async def test_config_file_healthcheck_on_a_non_default_listen_and_stop_drains(
    image: dict, tmp_path: Path
) -> None:
    """Config from a mounted file plus AMID_* overrides; the HEALTHCHECK asks the overridden
    http.listen; it turns unhealthy when the PBX goes away; `podman stop` makes amid exit 0 with every
    event in the volume."""
    listen = f"127.0.0.1:{free_port()}"
    config = tmp_path / "amid.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "servers": [
                    {
                        "name": "pbx1",
                        "host": "127.0.0.1",
                        "port": 1,
                        "username": "amid",
                        "secret_file": "/run/secrets/ami-secret",
                        "ping_interval": "1s",
                        "ping_timeout": "1s",
                    }
                ],
                "sinks": [{"name": "events", "type": "file", "path": "/var/lib/amid/events.jsonl"}],
            }
        )
    )
    config.chmod(0o644)
    sim = AMISimulator(stream_on_login=5000)
    await sim.start()
    try:
        with Container(
            "--volume",
            f"{config}:/etc/amid/amid.yaml:ro",
            "--volume",
            f"{secret_file(tmp_path)}:/run/secrets/ami-secret:ro",
            "--env",
            f"AMID_SERVERS__PBX1__PORT={sim.port}",  # the file's port 1 would never answer
            "--env",
            f"AMID_HTTP__LISTEN={listen}",
        ) as container:
            await container.wait_health("healthy")
            assert await asyncio.to_thread(http_status, f"http://{listen}/readyz") == 200
            events_file = container.state_dir() / "events.jsonl"
            await container.wait_records(events_file, sim, 5000)
            assert sim.stats.logins == 1
            assert events_file.stat().st_uid == UID
            denied = run("podman", "exec", container.name, "sh", "-c", "touch /opt/amid/x", check=False)
            assert denied.returncode != 0 and "Read-only file system" in denied.stderr, denied

            await sim.close()  # the PBX goes away (its last event: Shutdown)
            await container.wait_records(events_file, sim, 5000)
            await container.wait_health("unhealthy")
            sent = sim.stats.events_sent
            assert await container.stop() == 0, container.logs()
            assert_every_event([json.loads(line) for line in events_file.read_bytes().splitlines()], sent)
    finally:
        await sim.close()


async def test_configured_from_the_environment_only(image: dict, tmp_path: Path) -> None:
    listen = f"127.0.0.1:{free_port()}"
    async with AMISimulator(stream_on_login=2000) as sim:
        with Container(
            "--volume",
            f"{secret_file(tmp_path)}:/run/secrets/ami-secret:ro",
            "--env",
            "AMID_HOST=127.0.0.1",
            "--env",
            f"AMID_PORT={sim.port}",
            "--env",
            "AMID_USERNAME=amid",
            "--env",
            "AMID_SECRET_FILE=/run/secrets/ami-secret",
            "--env",
            "AMID_SINKS__0__NAME=events",
            "--env",
            "AMID_SINKS__0__TYPE=file",
            "--env",
            "AMID_SINKS__0__PATH=events.jsonl",  # relative: the working directory, the volume
            "--env",
            f"AMID_HTTP__LISTEN={listen}",
        ) as container:
            await container.wait_health("healthy")
            events_file = container.state_dir() / "events.jsonl"
            records = await container.wait_records(events_file, sim, 2000)
            assert records[0]["server"] == "default" and sim.stats.logins == 1
            sent = sim.stats.events_sent
            assert await container.stop() == 0, container.logs()
            assert_every_event([json.loads(line) for line in events_file.read_bytes().splitlines()], sent)
