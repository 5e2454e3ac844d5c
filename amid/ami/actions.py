"""Pre-canned actions (the seed's "precanned functions"), built on ``send_action`` alone."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from amid.ami.protocol import Response

__all__ = ["CannedActions"]


class CannedActions:
    """Shortcuts for common actions; a subclass provides :meth:`send_action`."""

    async def send_action(self, name: str,
                          fields: Mapping[str, Any] | Iterable[tuple[str, Any]] | None = None,
                          *, timeout: float | None = None) -> Response:
        raise NotImplementedError

    async def ping(self) -> Response:
        return await self.send_action("Ping")

    async def command(self, command: str) -> Response:
        """Run a CLI command; its lines are in ``response.output``."""
        return await self.send_action("Command", {"Command": command})

    async def originate(self, channel: str, *, exten: str | None = None, context: str | None = None,
                        priority: int | str | None = None, application: str | None = None,
                        data: str | None = None, timeout_ms: int | None = None,
                        caller_id: str | None = None, variables: Mapping[str, str] | None = None,
                        account: str | None = None, async_: bool = True,
                        extra: Mapping[str, str] | None = None) -> Response:
        fields: list[tuple[str, Any]] = [("Channel", channel)]
        for key, value in (("Exten", exten), ("Context", context), ("Priority", priority),
                           ("Application", application), ("Data", data), ("Timeout", timeout_ms),
                           ("CallerID", caller_id), ("Account", account)):
            if value is not None:
                fields.append((key, value))
        for var, value in (variables or {}).items():
            fields.append(("Variable", f"{var}={value}"))
        fields.append(("Async", "true" if async_ else "false"))
        fields.extend((extra or {}).items())
        return await self.send_action("Originate", fields)

    async def hangup(self, channel: str, cause: int | None = None) -> Response:
        fields: dict[str, Any] = {"Channel": channel}
        if cause is not None:
            fields["Cause"] = cause
        return await self.send_action("Hangup", fields)

    async def status(self, channel: str | None = None, variables: Sequence[str] = ()) -> Response:
        """``Status``: one ``Status`` event per channel in ``response.events``."""
        fields: dict[str, Any] = {}
        if channel:
            fields["Channel"] = channel
        if variables:
            fields["Variables"] = ",".join(variables)
        return await self.send_action("Status", fields)

    async def core_show_channels(self) -> Response:
        return await self.send_action("CoreShowChannels")

    async def getvar(self, variable: str, channel: str | None = None) -> Response:
        fields = {"Variable": variable, **({"Channel": channel} if channel else {})}
        return await self.send_action("Getvar", fields)
