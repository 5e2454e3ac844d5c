"""What gets published: the distribution's name in every install line, the wheel, the sdist (which
runs its own tests), the metadata and `twine check`."""

from __future__ import annotations

import email.parser
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

REPO_ROOT = Path(__file__).resolve().parent.parent
DISTRIBUTION = "asterisk-amid"  # "amid" on the package index is somebody else's project

# Text the scan skips: virtualenvs, build output, VCS data, binary captures.
_SKIP_DIRS = {
    ".git",
    ".venv",
    "build",
    "dist",
    "__pycache__",
    ".hypothesis",
    ".pytest_cache",
    "fixtures",
    "results",
}
_TEXT_SUFFIXES = {".py", ".md", ".toml", ".cfg", ".txt", ".sh", ".service", ".yaml", ".yml", ".in", ""}
_INSTALL = re.compile(r"\bpip3?\s+install\b")
# Where a shell command or a sentence ends: what follows is not an argument of pip.
_END = re.compile(r"\s(?:&&|\|\||;|\||#)|[;)`]|\s\\$")
_OPTIONS_WITH_A_VALUE = {
    "-r",
    "--requirement",
    "-c",
    "--constraint",
    "-t",
    "--target",
    "-i",
    "--index-url",
    "--extra-index-url",
    "-f",
    "--find-links",
    "--prefix",
    "--root",
    "--python-version",
    "--platform",
    "--cert",
    "--proxy",
    "--config-settings",
    "-C",
}


def text_files(root: Path) -> list[Path]:
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _SKIP_DIRS and not d.endswith(".egg-info")]
        for name in files:
            path = Path(directory, name)
            if path.suffix in _TEXT_SUFFIXES or name in ("Dockerfile", "run"):
                found.append(path)
    return found


def install_lines(root: Path) -> list[tuple[str, list[str]]]:
    """(file:line, the distributions named) for every `pip install` in the repository's text.

    Paths (`.`, `./examples/...`, `/path/to/amid[systemd]`), options and shell variables are not names."""
    lines = []
    for path in text_files(root):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            starts = [match for match in _INSTALL.finditer(line)]
            for match, following in zip(starts, [*starts[1:], None], strict=False):
                rest = line[match.end() : following.start() if following else len(line)]
                arguments = _END.split(rest, maxsplit=1)[0]
                try:
                    words = shlex.split(arguments)
                except ValueError:
                    words = arguments.split()
                names: list[str] = []
                skip_next = False
                for word in words:
                    if skip_next:
                        skip_next = False
                        continue
                    if word.startswith("-"):
                        skip_next = word in _OPTIONS_WITH_A_VALUE
                        continue
                    if (
                        word.startswith((".", "/", "~", "$", "file:", "http:", "https:", "git+"))
                        or "/" in word
                    ):
                        continue
                    try:
                        names.append(canonicalize_name(Requirement(word).name))
                    except InvalidRequirement:
                        names.append(word)  # not a requirement at all: shown in the failure
                lines.append((f"{path.relative_to(root)}:{number}", names))
    return lines


def test_the_distribution_has_a_name_of_its_own_and_keeps_the_amid_command() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == DISTRIBUTION
    assert project["scripts"] == {"amid": "amid.cli:main"}


def test_every_install_line_names_our_distribution() -> None:
    found = install_lines(REPO_ROOT)
    foreign = [(where, names) for where, names in found if any(name != DISTRIBUTION for name in names)]
    assert foreign == [], f"install lines naming a distribution that is not ours ({DISTRIBUTION}): {foreign}"
    # The scan sees the lines that matter: an operator's install lines and the runtime hint.
    ours = {where.split(":")[0] for where, names in found if DISTRIBUTION in names}
    assert {"README.md", "deploy/systemd/amid.service", "amid/logs.py"} <= ours, ours


def test_the_scan_catches_a_foreign_name(tmp_path: Path) -> None:
    install = "pip " + "install"  # spelt apart, so that this file holds no install line of its own
    (tmp_path / "INSTALL.md").write_text(
        f"{install} 'amid[systemd]'\n"
        f"sudo /opt/amid/bin/{install} -q asterisk-amid && {install} ./local/path\n"
        f"`{install}` builds it\n"
    )
    assert install_lines(tmp_path) == [
        ("INSTALL.md:1", ["amid"]),
        ("INSTALL.md:2", [DISTRIBUTION]),
        ("INSTALL.md:2", []),
        ("INSTALL.md:3", []),
    ]


# ------------------------------------------------------------------------------------- built artefacts


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The sdist and the wheel, built as a release would be (without isolation: the test extras hold
    setuptools, so no package index is needed)."""
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO_ROOT)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [sdist] = out.glob("*.tar.gz")
    [wheel] = out.glob("*.whl")
    return {"sdist": sdist, "wheel": wheel}


def test_twine_check_passes(dist: dict[str, Path]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", str(dist["sdist"]), str(dist["wheel"])],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("PASSED") == 2, result.stdout


def test_wheel_holds_the_package_its_license_and_no_c_source(dist: dict[str, Path]) -> None:
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        names = wheel.namelist()
        metadata = email.parser.Parser().parsestr(
            wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        )
        sample = wheel.read("amid/sample-config.yaml")
        license_text = wheel.read(
            next(n for n in names if n.endswith(".dist-info/licenses/LICENSE"))
        ).decode()
    assert not [n for n in names if n.endswith((".c", ".h", ".pyc"))], names
    assert "amid/py.typed" in names and "amid/cli.py" in names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "examples/"))]
    assert sample == (REPO_ROOT / "config" / "amid.yaml").read_bytes()  # what `amid init-config` prints
    assert metadata["Name"] == DISTRIBUTION
    assert metadata["License-Expression"] == "MIT" and metadata["License"] is None
    assert metadata.get_all("License-File") == ["LICENSE"]
    assert license_text == (REPO_ROOT / "LICENSE").read_text() and license_text.startswith("MIT License")
    classifiers = metadata.get_all("Classifier") or []
    assert "Typing :: Typed" in classifiers and "Topic :: Communications :: Telephony" in classifiers
    assert not [c for c in classifiers if c.startswith("License ::")]  # the SPDX expression says it once


def test_sdist_holds_what_an_operator_and_the_tests_need(dist: dict[str, Path]) -> None:
    with tarfile.open(dist["sdist"]) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert [n for n in names if n.endswith("/_speedups.c")], "the accelerator's C source"
    for needed in (
        "LICENSE",
        "README.md",
        "pyproject.toml",
        "setup.py",
        "amid/py.typed",
        "amid/sample-config.yaml",
        "config/amid.yaml",
        "deploy/systemd/amid.service",
        "deploy/systemd/amid.yaml",
        "Dockerfile",
        "tests/conftest.py",
        "tests/test_config.py",
        "tests/fixtures/README.md",
        "tests/fixtures/s04_originate_events.raw",
        "examples/amid_prefix_sink/pyproject.toml",
    ):
        assert needed in names, needed
    assert not [n for n in names if n.endswith((".so", ".pyc")) or "__pycache__" in n]


def test_pytest_runs_from_the_unpacked_sdist(dist: dict[str, Path], tmp_path: Path) -> None:
    """The sdist's own tests pass against the sdist's own sources (pure Python: nothing is compiled here)."""
    with tarfile.open(dist["sdist"]) as sdist:
        sdist.extractall(tmp_path, filter="data")
    [root] = tmp_path.iterdir()
    environ = {key: value for key, value in os.environ.items() if not key.startswith("AMID_")}
    environ["PYTHONPATH"] = str(root)
    where = subprocess.run(
        [sys.executable, "-c", "import amid; print(amid.__file__)"],
        check=False,
        capture_output=True,
        text=True,
        cwd=root,
        env=environ,
        timeout=60,
    )
    assert where.stdout.strip() == str(root / "amid" / "__init__.py"), where.stdout + where.stderr
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "not slow",
            "tests/test_config.py",
            "tests/test_protocol.py",
            "tests/test_deploy.py",
            "tests/test_packaging.py::test_every_install_line_names_our_distribution",
        ],
        check=False,
        capture_output=True,
        text=True,
        cwd=root,
        env=environ,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout
