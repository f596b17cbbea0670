"""Several Macs, one model (expert parallelism) from the app: the host list, the hostfile, the
command for each other Mac, and what the engine's events say about each host.

The app's engine runs as rank 0 (this Mac, the first host); every other Mac runs
`moebar-engine stdio` as its own rank and follows rank 0 (engine/serving/replicated.py). They find
each other through mlx.distributed's ring hostfile, a JSON list with one ``["host:port"]`` per rank.
Nothing here needs Qt; the Settings panel and its controller are in app/ui/several_macs_panel.py.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from app import paths

HOSTFILE_NAME = "hostfile.json"
MAX_HOSTS = 16
PEER_LOST = "peer_lost"  # the engine's error code (engine.model.expert_parallel.PeerLostError)
EXIT_PEER_LOST = 75  # a rank's exit status when a peer never answered (engine.model.expert_parallel)
OTHER_MAC_HOSTFILE = "$HOME/moebar-hosts.json"  # where the command for another Mac puts the hostfile
OTHER_MAC_ENGINE: tuple[str, ...] = ("moebar-engine", "stdio")

_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")

# Host states, as the Settings panel shows them.
THIS_MAC, WAITING, CONNECTED, LOST, ALONE = "rank 0", "waiting", "connected", "lost", "not connected"


class HostListError(ValueError):
    """A host list that cannot be used; the message names the line (1 = this Mac) and the problem."""


def check_host(text: str, line: int) -> str:
    """``text`` as ``host:port`` (spaces around it dropped), or HostListError naming ``line``."""
    entry = text.strip()
    host, sep, port = entry.rpartition(":")
    example = "e.g. 10.0.0.2:5100"
    if not sep or not host:
        raise HostListError(f"Line {line}: {entry!r} is not host:port ({example}).")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise HostListError(f"Line {line}: {entry!r} has no port from 1 to 65535 after the colon ({example}).")
    if not _is_host(host):
        raise HostListError(f"Line {line}: {host!r} in {entry!r} is not a host name or an IP address.")
    return f"{host}:{int(port)}"


def _is_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(_HOSTNAME.match(host))


def check_hosts(entries: Sequence[str]) -> tuple[str, ...]:
    """Every entry checked (line numbers count from 1, this Mac first), at most MAX_HOSTS, none twice."""
    if len(entries) > MAX_HOSTS:
        raise HostListError(f"{len(entries)} hosts: at most {MAX_HOSTS} Macs can share one model here.")
    hosts: list[str] = []
    for line, text in enumerate(entries, 1):
        if not isinstance(text, str):
            raise HostListError(f"Line {line}: {text!r} is not text (host:port).")
        host = check_host(text, line)
        if host in hosts:
            raise HostListError(f"Line {line}: {host} is already on line {hosts.index(host) + 1}.")
        hosts.append(host)
    return tuple(hosts)


def parse_hosts(text: str) -> tuple[str, ...]:
    """The hosts typed one per line (blank lines skipped); HostListError names the line of a bad one."""
    lines: dict[str, int] = {}  # host -> the line it is on
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        host = check_host(line, n)
        if host in lines:
            raise HostListError(f"Line {n}: {host} is already on line {lines[host]}.")
        lines[host] = n
    if len(lines) > MAX_HOSTS:
        raise HostListError(f"{len(lines)} hosts: at most {MAX_HOSTS} Macs can share one model here.")
    return tuple(lines)


def is_active(enabled: bool, hosts: Sequence[str]) -> bool:
    """Whether the app runs its engine as rank 0 of several: switched on, with this Mac and at least one other."""
    return enabled and len(hosts) >= 2


def hostfile_text(hosts: Sequence[str]) -> str:
    """mlx.distributed's ring hostfile for ``hosts``: a JSON list of ``["host:port"]``, one per rank, in order."""
    return json.dumps([[host] for host in hosts])


def hostfile_path() -> Path:
    """Where the app writes its hostfile: its config folder, next to settings.json."""
    return paths.config_dir() / HOSTFILE_NAME


def write_hostfile(path: Path, hosts: Sequence[str]) -> None:
    """Write the hostfile atomically (a temp file in the same folder, then a rename)."""
    paths.ensure_dir(path.parent)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(hostfile_text(hosts) + "\n")
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def engine_environment(enabled: bool, hosts: Sequence[str], hostfile: Path) -> dict[str, str]:
    """The variables that make the app's engine rank 0 of the hosts; empty when it runs alone."""
    if not is_active(enabled, hosts):
        return {}
    return {"MLX_RANK": "0", "MLX_HOSTFILE": str(hostfile)}


def other_mac_command(rank: int, hosts: Sequence[str], engine: Sequence[str] = OTHER_MAC_ENGINE) -> str:
    """The shell lines to paste on the Mac of ``rank``: write the same hostfile, then start its engine."""
    if not 0 < rank < len(hosts):
        raise ValueError(f"rank {rank} is not another Mac of {len(hosts)}")
    write = f"echo {shlex.quote(hostfile_text(hosts))} > \"{OTHER_MAC_HOSTFILE}\""
    start = f"MLX_RANK={rank} MLX_HOSTFILE=\"{OTHER_MAC_HOSTFILE}\" {shlex.join(engine)}"
    return f"{write}\n{start}"


def peer_lost_sentence(hosts: Sequence[str]) -> str:
    """What the app says when a rank stopped answering (error code ``peer_lost`` or exit status 75)."""
    others = list(hosts[1:])
    if len(others) == 1:
        who = f"The Mac at {others[0]}"
    elif others:
        who = f"One of the other Macs ({', '.join(others)})"
    else:
        who = "Another Mac running part of the model"
    return (f"{who} stopped answering or cannot be reached, so the model stopped on every Mac. Start the "
            "engine on it again with the command in Settings → Several Macs; this Mac's engine restarts "
            "and waits for it.")


@dataclass(frozen=True)
class HostState:
    """One row of the panel: the host, its state (THIS_MAC, WAITING, CONNECTED, LOST, ALONE) and a detail."""

    host: str
    state: str
    detail: str = ""

    def text(self) -> str:
        """The row as shown: ``host: state`` and the detail, if any."""
        line = f"{self.host} — {self.state}"
        return f"{line}: {self.detail}" if self.detail else line


class HostStates:
    """Each host's state, from the engine's events (the Qt controller feeds them in)."""

    def __init__(self, hosts: Sequence[str] = ()) -> None:
        self.hosts: tuple[str, ...] = tuple(hosts)
        self._others = WAITING
        self._detail = ""
        self._connected_once = False

    def reset(self, hosts: Sequence[str]) -> None:
        """A new host list (or the engine started again on it): every other host waits."""
        self.hosts = tuple(hosts)
        self._others, self._detail, self._connected_once = WAITING, "", False

    def loaded(self, ranks: int) -> None:
        """A model loaded on ``ranks`` ranks: the others are connected (or, on one rank, not)."""
        if ranks >= len(self.hosts) >= 2:
            self._others, self._detail, self._connected_once = CONNECTED, "", True
        else:
            self._others, self._detail = ALONE, f"the engine runs on {ranks} rank{'s' if ranks != 1 else ''}"

    def peer_lost(self, message: str) -> None:
        """A rank stopped answering: lost once they had been connected; before that, still waiting (and why)."""
        self._others = LOST if self._connected_once else WAITING
        self._detail = message

    def rows(self) -> list[HostState]:
        """This Mac first (rank 0), then every other host."""
        if len(self.hosts) < 2:
            return [HostState(host, THIS_MAC if i == 0 else WAITING) for i, host in enumerate(self.hosts)]
        return [HostState(self.hosts[0], THIS_MAC, "this Mac")] + [
            HostState(host, self._others, self._detail) for host in self.hosts[1:]]
