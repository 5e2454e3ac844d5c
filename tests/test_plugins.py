"""Third-party sinks load from the ``amid.sinks`` entry-point group.

The example plugin in examples/amid_prefix_sink is made importable and registered through a real
``*.dist-info/entry_points.txt`` on sys.path, exactly what ``pip install`` leaves behind, so
importlib.metadata finds it the way it finds an installed plugin.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
from pathlib import Path

import pytest
import yaml
from sink_contract import SinkContract

from amid.config import ConfigError
from amid.service import load_config
from amid.sinks.base import Sink, SinkError
from amid.sinks.registry import BUILTIN_SINKS, SinkTypes, SinkTypeUnavailable

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "amid_prefix_sink"


def install_dist(site: Path, name: str, entry_points: str) -> None:
    info = site / f"{name}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(entry_points)


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    install_dist(site, "amid_prefix_sink", "[amid.sinks]\nprefix = amid_prefix_sink:create\n")
    install_dist(site, "amid_broken_sink", "[amid.sinks]\nbroken = amid_broken_sink_mod:create\n")
    (site / "amid_broken_sink_mod.py").write_text("raise RuntimeError('missing dependency: libfoo')\n")
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    yield site
    for mod in ("amid_prefix_sink", "amid_broken_sink_mod"):
        sys.modules.pop(mod, None)


def test_plugins_are_discovered_and_a_broken_one_is_named(plugins):
    types = SinkTypes.discover()
    assert "prefix" in types
    assert types.option_models["prefix"].__name__ == "Options"
    assert {"file", "syslog", "webhook", "prefix", "broken"} <= set(types.names())
    assert len(types.errors) == 1
    message = str(types.errors[0])
    assert "broken" in message and "missing dependency: libfoo" in message
    with pytest.raises(SinkTypeUnavailable, match="missing dependency: libfoo"):
        types.factory("broken")


def test_built_ins_and_plugins_are_found_the_same_way(plugins):
    """One rule for every type: the entry point's factory, and its (module's) Options model."""
    types = SinkTypes.discover()
    for name in [*BUILTIN_SINKS, "prefix"]:
        sink_type = types.get(name)
        assert callable(sink_type.factory)
        assert sink_type.options is importlib.import_module(sink_type.factory.__module__).Options


def test_a_built_in_loads_only_when_used(tmp_path):
    """Validating a config imports only the sink modules its sinks use; a built-in whose module
    cannot be imported makes only that type unavailable, with the reason."""
    types = SinkTypes({**BUILTIN_SINKS, "missing": "amid_no_such_module_here:create"})
    assert "missing" in types.option_models and "missing" in list(types.option_models)
    with pytest.raises(SinkTypeUnavailable, match="ModuleNotFoundError"):
        types.option_models["missing"]
    config = tmp_path / "amid.yaml"
    config.write_text(yaml.safe_dump({
        "servers": [{"host": "127.0.0.1", "username": "amid", "secret": "x"}],
        "sinks": [{"name": "a", "type": "file", "path": str(tmp_path / "a.log")},
                  {"name": "b", "type": "missing"}],
    }))
    with pytest.raises(ConfigError) as err:
        load_config(str(config), {}, types)
    assert [p.path for p in err.value.problems] == ["sinks[1].type"]
    assert "sink type 'missing' is not available" in str(err.value)


def test_a_plugin_cannot_replace_a_built_in(tmp_path, monkeypatch):
    site = tmp_path / "site"
    install_dist(site, "amid_fake_file", "[amid.sinks]\nfile = amid_prefix_sink:create\n")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    types = SinkTypes.discover()
    assert types.factory("file").__module__ == "amid.sinks.file"
    assert any("ignored: a built-in sink type has that name" in str(e) for e in types.errors)


def test_plugin_options_are_validated_with_their_yaml_line(plugins, tmp_path):
    types = SinkTypes.discover()
    config = tmp_path / "amid.yaml"
    config.write_text(yaml.safe_dump({
        "servers": [{"host": "127.0.0.1", "username": "amid", "secret": "x"}],
        "sinks": [{"name": "tagged", "type": "prefix", "path": str(tmp_path / "out.log"),
                   "prefx": "oops"}],
    }, sort_keys=False))
    with pytest.raises(ConfigError) as err:
        load_config(str(config), {}, types)
    assert "sinks[0].prefx" in str(err.value) and "amid.yaml:" in str(err.value)


async def test_a_plugin_runs_in_the_daemon(plugins, tmp_path):
    from amid.service import Daemon
    from amid.simulator import AMISimulator
    out = tmp_path / "tagged.log"
    async with AMISimulator(call_spread=0.0) as sim:
        config = tmp_path / "amid.yaml"
        config.write_text(yaml.safe_dump({
            "servers": [{"name": "pbx1", "host": "127.0.0.1", "port": sim.port, "username": "amid",
                         "secret": "amidsecret"}],
            "sinks": [{"name": "tagged", "type": "prefix", "path": str(out), "prefix": "pbx>",
                       "include": ["Newchannel"], "batch": {"max_wait": "10ms"}}],
            "http": {"listen": ""}, "state_dir": str(tmp_path / "state"),
        }))
        types = SinkTypes.discover()
        daemon = Daemon(load_config(str(config), {}, types), config_path=str(config), environ={},
                        types=types, install_signals=False)
        task = asyncio.create_task(daemon.run())
        try:
            async with asyncio.timeout(10):
                await daemon.ready.wait()
                sim.originate("Local/200@test", exten="100")
                while not out.exists() or len(out.read_text().splitlines()) < 4:
                    await asyncio.sleep(0.02)
        finally:
            daemon.request_stop()
            async with asyncio.timeout(10):
                await task
    lines = out.read_text().splitlines()
    assert all(line.startswith("pbx> ") for line in lines)
    assert {json.loads(line[5:])["event"] for line in lines} == {"Newchannel"}


class TestPrefixSinkContract(SinkContract):
    """The example plugin passes the same contract as the built-in sinks."""

    @pytest.fixture(autouse=True)
    def target(self, plugins, tmp_path):
        self.path = tmp_path / "contract.log"

    async def make_sink(self) -> Sink:
        module = importlib.import_module("amid_prefix_sink")
        return module.create("contract", {"path": str(self.path), "prefix": "p"})

    async def received(self, n: int) -> list[dict]:
        async with asyncio.timeout(self.wait_timeout):
            while True:
                lines = self.path.read_text().splitlines() if self.path.exists() else []
                if len(lines) >= n:
                    return [json.loads(line[2:]) for line in lines]
                await asyncio.sleep(0.01)

    async def break_peer(self) -> None:
        # root ignores permission bits: make the path a directory instead, so open() fails
        self.path.unlink(missing_ok=True)
        self.path.mkdir()


def test_sink_error_is_the_plugin_contract():
    assert issubclass(SinkError, Exception)
