"""The README's library example runs as written against the simulator (only the address, the secret
and the final wait differ), so the first code a new user copies cannot drift from the API."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from amid.simulator import AMISimulator

README = Path(__file__).resolve().parent.parent / "README.md"


def library_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("\n## The library\n"):]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "the library section has no python example"
    return match.group(1)


async def test_the_readme_library_example_runs_against_the_simulator():
    code = library_example()
    assert 'AMIClient("pbx.example.net", username="amid", secret="s3cret")' in code
    assert "await asyncio.sleep(60)" in code and code.rstrip().endswith("asyncio.run(main())")
    printed: list[str] = []
    hung_up = asyncio.Event()

    def capture_print(*args: object) -> None:  # the example reports by printing
        line = " ".join(map(str, args))
        printed.append(line)
        if line.startswith("hangup "):
            hung_up.set()

    async with AMISimulator(call_spread=0.0) as sim:
        address = f"127.0.0.1:{sim.port}"
        code = (code.replace('"pbx.example.net"', f'"{address}"')
                    .replace('secret="s3cret"', 'secret="amidsecret"')
                    .replace('"PJSIP/100"', '"Local/200@test"').replace('"Exten": "200"', '"Exten": "100"')
                    .replace("await asyncio.sleep(60)", "await asyncio.wait_for(hung_up.wait(), 10)")
                    .replace("asyncio.run(main())", ""))
        namespace = {"print": capture_print, "hung_up": hung_up}
        exec(compile(code, "README.md", "exec"), namespace)  # defines main() and the handlers
        async with asyncio.timeout(20):
            await namespace["main"]()

    assert any(line.startswith("DialBegin ") for line in printed)     # the Dial* glob handler
    assert any(line.startswith(f"{address} ") for line in printed)    # the * handler
    assert any(line.startswith(f"{address} 1 ") and "FullyBooted" in line for line in printed)
    assert any("active channels" in line for line in printed)         # the command output
    assert sum(line.startswith("hangup ") for line in printed) >= 1


def test_every_delivery_guarantee_names_tests_that_exist():
    """Each promise of "Delivery guarantees" names the tests that back it (*file: test_name*);
    a renamed or deleted test must not leave a promise with nothing behind it."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("\n## Delivery guarantees\n"):text.index("\n## Metrics and health\n")]
    promises = [p for p in re.split(r"\n\* ", section)[1:]]
    assert len(promises) >= 8
    tests_dir = Path(__file__).resolve().parent
    defined = set()
    for path in [*tests_dir.glob("test_*.py"), *tests_dir.glob("conservation/test_*.py")]:
        defined.update(re.findall(r"^(?:async )?def (test_\w+)", path.read_text(encoding="utf-8"), re.M))
        defined.add(path.stem)  # a promise may name a whole test file
    for promise in promises:
        named = re.findall(r"\btest_\w+", promise)
        assert named, f"a promise names no test: {promise[:80]!r}"
        missing = [name for name in named if name not in defined]
        assert not missing, f"tests named in the README do not exist: {missing}"
