"""Asking a Linux guest how it is, from the root namespace: its agent, and a 10 ms pinger.

The agent is busybox httpd with one CGI (lab/guest/agent.cgi) on the guest's port 80: it
reports the disk writer's counter, the log's continuity, write errors and the boot id, starts
and stops a memory writer, and checks the file system. The pinger sends ICMP echo requests at
a fixed interval on a raw socket (we are root) and reports the longest gap between replies:
the guest's downtime as its network sees it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import struct
import threading
import time
import urllib.request
from dataclasses import dataclass, field

from lab.proc import LabError

# Under TCG with the memory writer running, a CGI fork-and-answer can take seconds.
AGENT_TIMEOUT_S = 20.0
# The first boot under TCG: kernel, modules, then the agent (about 5 s; slack for a busy box).
BOOT_TIMEOUT_S = 90.0
# An fsck stops the writer, remounts read-only and reads the whole small disk.
FSCK_TIMEOUT_S = 60.0
PING_INTERVAL_S = 0.010
# How long a late reply may still arrive after the pinger stops sending.
PING_DRAIN_S = 0.5
ICMP_ECHO_REQUEST = 8
ICMP_ECHO_REPLY = 0


@dataclass(frozen=True)
class GuestStatus:
    """The agent's answer to `status`."""

    counter: int
    last_write: int
    lines: int
    gaps: int
    write_errors: int
    boot_id: str
    uptime: float
    memwriter: bool
    writer: bool


def agent(address: str, request: str, timeout: float = AGENT_TIMEOUT_S) -> dict[str, object]:
    """One agent request's JSON answer; LabError (one line) when the guest does not answer."""
    url = f"http://{address}/cgi-bin/agent?{request}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            answer: dict[str, object] = json.loads(resp.read().decode())
    except (OSError, ValueError) as exc:
        raise LabError(f"the guest agent at {address} ({request}): {exc}") from None
    return answer


def status(address: str) -> GuestStatus:
    return GuestStatus(**agent(address, "status"))  # type: ignore[arg-type]


def set_memwriter(address: str, running: bool) -> GuestStatus:
    return GuestStatus(**agent(address, "memwriter-" + ("start" if running else "stop")))  # type: ignore[arg-type]


def fsck(address: str) -> tuple[int, str]:
    """e2fsck -fn of the guest's disk, from inside (read-only remount): exit code, output."""
    answer = agent(address, "fsck", timeout=FSCK_TIMEOUT_S)
    return int(str(answer["fsck_rc"])), str(answer["fsck_output"])


def wait_until_up(address: str, timeout: float = BOOT_TIMEOUT_S) -> GuestStatus:
    """Poll the agent until it answers and the writer has written; its status."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            st = status(address)
            if st.counter > 0:
                return st
        except LabError:
            pass
        if time.monotonic() > deadline:
            raise LabError(f"the Linux guest at {address} did not come up in {timeout:.0f}s")
        time.sleep(0.5)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def _echo_request(ident: int, seq: int) -> bytes:
    header = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, seq)
    payload = b"drover-ping"
    csum = _checksum(header + payload)
    return struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, csum, ident, seq) + payload


@dataclass
class PingResult:
    sent: int
    received: int
    longest_gap_s: float  # between two consecutive replies (or the start and the first)

    @property
    def lost(self) -> int:
        return self.sent - self.received


@dataclass
class Pinger:
    """Pings `address` every `interval` s from start() until stop(); a context manager."""

    address: str
    interval: float = PING_INTERVAL_S
    _replies: dict[int, float] = field(default_factory=dict)
    _sent: int = 0
    _started: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._ident = os.getpid() & 0xFFFF ^ id(self) & 0xFFFF
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        self._sock.settimeout(0.1)

    def __enter__(self) -> Pinger:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        if self._threads:
            self.stop()

    def start(self) -> None:
        self._started = time.monotonic()
        self._threads = [
            threading.Thread(target=self._send_loop, daemon=True),
            threading.Thread(target=self._recv_loop, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _send_loop(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            seq = self._sent & 0xFFFF
            # No route for a moment: counted as lost.
            with contextlib.suppress(OSError):
                self._sock.sendto(_echo_request(self._ident, seq), (self.address, 0))
            self._sent += 1
            next_at += self.interval
            time.sleep(max(0.0, next_at - time.monotonic()))

    def _recv_loop(self) -> None:
        drain_until = float("inf")
        while time.monotonic() < drain_until:
            if self._stop.is_set() and drain_until == float("inf"):
                drain_until = time.monotonic() + PING_DRAIN_S
            try:
                data, (src, _) = self._sock.recvfrom(2048)
            except (TimeoutError, OSError):
                continue
            ihl = (data[0] & 0x0F) * 4
            kind, _code, _csum, ident, seq = struct.unpack("!BBHHH", data[ihl : ihl + 8])
            if src == self.address and kind == ICMP_ECHO_REPLY and ident == self._ident:
                self._replies.setdefault(seq, time.monotonic())

    def stop(self) -> PingResult:
        self._stop.set()
        for t in self._threads:
            t.join()
        self._threads = []
        self._sock.close()
        times = sorted(self._replies.values())
        marks = [self._started, *times]
        gap = max((b - a for a, b in itertools.pairwise(marks)), default=0.0)
        return PingResult(sent=self._sent, received=len(times), longest_gap_s=gap)
