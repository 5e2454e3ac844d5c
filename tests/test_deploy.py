"""Deployment artefacts: the systemd unit (systemd-analyze), the Dockerfile (hadolint) and what they promise.

systemd-analyze and hadolint are real tools run on the real files. When one is missing the test is skipped on a
developer machine and fails in CI (where $CI is set), so CI cannot go green without having run them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
UNIT = REPO_ROOT / "deploy" / "systemd" / "amid.service"
UNIT_CONFIG = REPO_ROOT / "deploy" / "systemd" / "amid.yaml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"

MAX_EXPOSURE = 1.5


def require_tool(name: str) -> str:
    """The path of a tool from the venv (next to this Python) or PATH; skip locally and fail in CI when missing."""
    beside_python = Path(sys.executable).parent / name
    found = str(beside_python) if beside_python.is_file() else shutil.which(name)
    if found is None:
        message = f"{name} is not installed"
        if os.environ.get("CI"):
            pytest.fail(message + " (required in CI)")
        pytest.skip(message)
    return found


def run_tool(*command: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "NO_COLOR": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=cwd, env=environ)


def unit_directives(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment in a unit file, in order; repeated keys stay repeated."""
    section, directives = "", []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        directives.append((section, key.strip(), value.strip()))
    return directives


def directive(text: str, key: str) -> str:
    values = [value for _, name, value in unit_directives(text) if name == key]
    assert values, f"{key}= missing"
    return values[-1]


# ---------------------------------------------------------------------------------------------------- systemd


def test_unit_verifies_cleanly(tmp_path) -> None:
    """`systemd-analyze verify` prints nothing on the unit installed as documented.

    verify checks that ExecStart's binary exists; /usr/local/bin/amid does not on a build machine, so the unit is
    copied with ExecStart pointing at a symlink to this checkout's amid script (the documented
    `ln -s /opt/amid/bin/amid /usr/local/bin/amid`), nothing else changed; /etc/default/amid need not exist.
    """
    systemd_analyze = require_tool("systemd-analyze")
    amid_script = Path(sys.executable).parent / "amid"
    executable = amid_script if amid_script.is_file() else Path(sys.executable)
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/amid " in text
    link = tmp_path / "usr-local-bin" / "amid"
    link.parent.mkdir()
    link.symlink_to(executable)
    copy = tmp_path / "amid.service"  # verify wants the real unit name
    copy.write_text(text.replace("ExecStart=/usr/local/bin/amid ", f"ExecStart={link} "))

    result = run_tool(systemd_analyze, "verify", str(copy), cwd=tmp_path)

    assert result.stdout + result.stderr == ""
    assert result.returncode == 0


def test_unit_security_exposure_is_low() -> None:
    systemd_analyze = require_tool("systemd-analyze")
    result = run_tool(systemd_analyze, "security", "--offline=true", "--no-pager", str(UNIT))
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for amid\.service: (\d+(?:\.\d+)?) ", output)
    assert match, output
    assert float(match.group(1)) <= MAX_EXPOSURE, output


def test_unit_is_a_notify_service_with_watchdog_reload_and_credentials() -> None:
    text = UNIT.read_text()
    assert directive(text, "Type") == "notify"
    assert directive(text, "NotifyAccess") == "main"
    assert directive(text, "ExecStart").split()[1:] == ["run", "--config", "/etc/amid/amid.yaml"]
    assert directive(text, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert directive(text, "WatchdogSec") == "30s"
    assert directive(text, "Restart") == "on-failure"
    assert directive(text, "TimeoutStopSec") == "30s"
    assert directive(text, "StateDirectory") == "amid"
    assert directive(text, "ConfigurationDirectory") == "amid"
    assert directive(text, "LoadCredential") == "ami-secret:/etc/amid/ami-secret"
    assert directive(text, "DynamicUser") == "yes"
    # AMID_* overrides for the service, as in a container; optional ("-").
    assert directive(text, "EnvironmentFile") == "-/etc/default/amid"
    # Outbound TCP/UDP to Asterisk, webhooks and syslog, a listening metrics socket: the network stays usable.
    assert set(directive(text, "RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    keys = {key for _, key, _ in unit_directives(text)}
    assert "PrivateNetwork" not in keys and "IPAddressDeny" not in keys


def test_example_config_for_the_unit_is_valid_and_fits_it(tmp_path) -> None:
    """deploy/systemd/amid.yaml validates as the service would see it, with its credential and state directory."""
    from amid.config import load

    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "ami-secret").write_text("s3cret\n")
    environ = {"CREDENTIALS_DIRECTORY": str(credentials), "STATE_DIRECTORY": "/var/lib/amid"}

    config = load(UNIT_CONFIG, environ)

    assert config.servers[0].secret == "s3cret"  # secret_file resolved against $CREDENTIALS_DIRECTORY
    assert str(config.state_dir) == "/var/lib/amid"
    unit = UNIT.read_text()
    stop_timeout = float(directive(unit, "TimeoutStopSec").removesuffix("s"))
    assert config.shutdown_timeout < stop_timeout  # drain finishes before systemd sends SIGKILL
    writable = ["/var/lib/" + directive(unit, "StateDirectory"), "/var/log/" + directive(unit, "LogsDirectory")]
    for sink in config.sinks:
        path = getattr(sink.options, "path", None)
        if path is not None:
            assert any(str(path).startswith(prefix + "/") for prefix in writable), path


# ---------------------------------------------------------------------------------------------------- container


def test_hadolint_reports_nothing() -> None:
    hadolint = require_tool("hadolint")
    result = run_tool(hadolint, "--no-color", str(DOCKERFILE), cwd=REPO_ROOT)
    assert result.stdout + result.stderr == ""
    assert result.returncode == 0


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with continuation lines joined and comments dropped."""
    logical, pending = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in logical]


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (name, _) in enumerate(instructions) if name == "FROM")
    return instructions[last_from:]


# The one image from outside the Dockerfile: Debian's slim image, for which tests/test_container.py
# builds an honest local stand-in (Debian minbase with the slim image's dpkg excludes) with mmdebstrap.
BASE_IMAGE = "debian:bookworm-slim"


def test_image_is_multi_stage_on_debian_slim_with_nothing_built_in_the_final_stage() -> None:
    froms = [args.split() for name, args in dockerfile_instructions() if name == "FROM"]
    stages = {words[2].lower() for words in froms if len(words) == 3 and words[1].upper() == "AS"}
    external = [words[0] for words in froms if words[0].lower() not in stages]
    assert external == [BASE_IMAGE], froms
    assert len(froms) >= 2
    assert any(
        name == "COPY" and args.startswith("--from=builder ") for name, args in final_stage()
    ), "the final stage copies the built virtualenv, nothing is built in it"
    final_runs = " ".join(args for name, args in final_stage() if name == "RUN")
    assert "pip" not in final_runs and "apt-get" not in final_runs and "gcc" not in final_runs
    # The accelerator check imports the installed module, not the source tree in the working directory.
    builder_runs = " ".join(args for name, args in dockerfile_instructions() if name == "RUN")
    assert re.search(r'python -P -c "import amid(\.ami)?\._speedups"', builder_runs), builder_runs
    assert "pip uninstall --yes --quiet pip setuptools" in builder_runs  # no pip in the final image


def test_final_stage_runs_as_numeric_non_root_with_healthcheck_and_exec_form() -> None:
    stage = final_stage()
    values = {name: args for name, args in stage}  # the last of each instruction in the final stage
    user, _, group = values["USER"].partition(":")
    assert user.isdigit() and int(user) != 0 and (not group or group.isdigit())
    assert values["HEALTHCHECK"].endswith('CMD ["amid", "healthcheck"]')
    assert values["ENTRYPOINT"] == '["amid"]'
    assert values["CMD"] == '["run", "--log-format", "json"]'
    assert values["EXPOSE"] == "9180"
    assert values["STOPSIGNAL"] == "SIGTERM"
    assert values["VOLUME"] == '["/var/lib/amid"]'
    environment = " ".join(args for name, args in stage if name == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in environment
    assert "AMID_STATE_DIR=/var/lib/amid" in environment  # the only writable place under --read-only
    assert "AMID_HTTP__LISTEN=0.0.0.0:9180" in environment  # probes reach the pod IP, not 127.0.0.1
    everything = DOCKERFILE.read_text()
    assert "curl" not in everything.replace("no curl", "") and "wget" not in everything


def test_environment_in_the_image_is_a_valid_config(tmp_path) -> None:
    """The image's AMID_* defaults plus the minimal container settings validate without a config file."""
    from amid.config import load

    image_environment = {}
    for name, args in final_stage():
        if name == "ENV":
            for assignment in args.split():
                key, _, value = assignment.partition("=")
                image_environment[key] = value
    (tmp_path / "ami").write_text("s3cret\n")
    environ = {
        **{key: value for key, value in image_environment.items() if key.startswith("AMID_")},
        "AMID_HOST": "pbx.example.net",
        "AMID_USERNAME": "amid",
        "AMID_SECRET_FILE": str(tmp_path / "ami"),
    }
    config = load(None, environ)
    assert config.http.listen == "0.0.0.0:9180"
    assert str(config.state_dir) == "/var/lib/amid"


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax: `*` and `?` stay within a path segment, `**` spans segments."""
    parts = re.split(r"(\*\*/?|\*|\?)", pattern.strip("/"))
    translated = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
    return re.compile("".join(translated.get(part, re.escape(part)) for part in parts) + r"\Z")


def sent_to_docker(relative_path: str, patterns: list[str]) -> bool:
    """Whether the build context includes a file, by .dockerignore rules (the last matching pattern wins; a
    pattern matching a parent directory matches everything inside it)."""
    segments = relative_path.split("/")
    candidates = ["/".join(segments[: i + 1]) for i in range(len(segments))]
    included = True
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = _dockerignore_regex(pattern.removeprefix("!"))
        if any(regex.match(candidate) for candidate in candidates):
            included = negated
    return included


def test_build_context_holds_what_the_dockerfile_copies_and_nothing_else() -> None:
    patterns = [
        line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    copied = [
        source
        for name, args in dockerfile_instructions()
        if name == "COPY" and not args.startswith("--from=")
        for source in args.split()[:-1]
    ]
    assert copied, "the builder copies the sources"
    for source in copied:
        assert (REPO_ROOT / source).exists(), f"COPY {source}: missing from the repository"
        assert sent_to_docker(source, patterns), f"COPY {source}: excluded by .dockerignore"
    for module in (REPO_ROOT / "amid").rglob("*.py"):
        assert sent_to_docker(module.relative_to(REPO_ROOT).as_posix(), patterns), module
    for private in (".git/config", ".venv/bin/python", "tests/test_deploy.py", "amid/__pycache__/x.pyc",
                    "amid/ami/__pycache__/protocol.cpython-311.pyc", "benchmarks/run.py"):
        assert not sent_to_docker(private, patterns), private


def test_ci_runs_the_readme_s_test_command_as_written() -> None:
    """CI runs on a clean clone exactly what a new user types: the README's second command."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("```sh\n", 1)[1].split("```", 1)[0]
    test_command = block.splitlines()[1].split("#", 1)[0].strip()
    assert test_command == "scripts/test.sh"
    ci = (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8")
    commands = [line.strip() for line in ci.splitlines() if line.strip() and not line.startswith("#")]
    assert commands[-1] == test_command
    assert os.access(REPO_ROOT / ".ci" / "run", os.X_OK) and os.access(REPO_ROOT / "scripts" / "test.sh", os.X_OK)
