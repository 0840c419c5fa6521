"""A raw D-Bus client (standard library only) for the flood and policy tests.

`python rawbus.py own ADDRESS NAME` asks for a bus name and prints the bus's
answer: "granted" or the error name.

`python rawbus.py subscribe ADDRESS READERS SILENT` opens READERS + SILENT
connections to the bus, each subscribed to Snapshot signals, prints "ready",
then reads (and discards) everything the READERS receive, counting Snapshot
messages by their member name in the byte stream — cheap enough that 19 readers
keep up where 19 decoding clients could not. SILENT connections never read.
When stdin closes it prints the counts as JSON.

`python rawbus.py signal ADDRESS PATH INTERFACE MEMBER` sends that signal
(forging one of damond's, when run as another user) and prints "routed" once the
bus has dealt with it.

The attacks of tests/test_attacks.py, as an unprivileged user would make them:
`python rawbus.py flood ADDRESS DESTS PATH INTERFACE MEMBER RATE` calls MEMBER
on PATH of each destination (comma-separated bus names) RATE times a second and
never reads a reply, until stdin closes; `python rawbus.py burst ADDRESS DESTS
PATH INTERFACE MEMBER COUNT CONNS` sends COUNT pipelined calls to each
destination from each of CONNS connections, prints "sent", and reads nothing
until stdin closes.

Standard library only (the messages it sends are marshalled here), so it runs
under any Python 3 as any user, e.g. as `nobody` through setpriv.
"""

from __future__ import annotations

import json
import os
import select
import selectors
import socket
import struct
import sys
import time

MARKER = b"\x08\x00\x00\x00Snapshot\x00"  # member header field: u32 length, "Snapshot"
RULE = "type='signal',interface='org.damond1.Context',member='Snapshot'"
FLOOD_TICK_S = 0.01


def _pad(buf: bytearray, n: int) -> None:
    buf += b"\0" * (-len(buf) % n)


def _string(buf: bytearray, text: str) -> None:
    _pad(buf, 4)
    data = text.encode()
    buf += struct.pack("<I", len(data)) + data + b"\0"


def message(
    serial: int,
    kind: int,
    path: str,
    interface: str,
    member: str,
    *args: str | int,
    destination: str | None = None,
) -> bytes:
    """A little-endian message (kind 1: method call, 4: signal); args are strings or
    uint32s."""
    fields = bytearray()  # starts at offset 16, so 8-alignment here is alignment there
    headers = [(1, "o", path), (2, "s", interface), (3, "s", member)]
    if destination is not None:
        headers.append((6, "s", destination))
    signature = "".join("s" if isinstance(a, str) else "u" for a in args)
    if args:
        headers.append((8, "g", signature))
    for code, sig, value in headers:
        _pad(fields, 8)
        fields += bytes([code, 1]) + sig.encode() + b"\0"
        if sig == "g":
            fields += bytes([len(value)]) + value.encode() + b"\0"
        else:
            _string(fields, value)
    body = bytearray()
    for arg in args:
        if isinstance(arg, str):
            _string(body, arg)
        else:
            _pad(body, 4)
            body += struct.pack("<I", arg)
    header = bytearray(struct.pack("<cBBBIII", b"l", kind, 0, 1, len(body), serial, len(fields)))
    header += fields
    _pad(header, 8)
    return bytes(header + body)


def method_call(serial: int, member: str, *args: str | int) -> bytes:
    """A METHOD_CALL to the bus daemon itself."""
    return message(
        serial,
        1,
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus",
        member,
        *args,
        destination="org.freedesktop.DBus",
    )


def connect(address: str, *first: bytes) -> socket.socket:
    path = dict(kv.split("=", 1) for kv in address.split(":", 1)[1].split(","))["path"]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    uid = str(os.getuid()).encode().hex()
    sock.sendall(b"\0AUTH EXTERNAL " + uid.encode() + b"\r\n")
    assert sock.recv(4096).startswith(b"OK"), "bus refused EXTERNAL auth"
    sock.sendall(b"BEGIN\r\n")
    sock.sendall(method_call(1, "Hello") + b"".join(first))
    return sock


def own(address: str, name: str) -> str:
    """RequestName(name, DO_NOT_QUEUE): "granted" or the error's name."""
    sock = connect(address, method_call(2, "RequestName", name, 4))
    received = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return "disconnected"
        received += chunk
        error = received.find(b"org.freedesktop.DBus.Error.")
        if error >= 0:
            end = received.index(b"\0", error)
            return received[error:end].decode()
        # only a NameAcquired signal for it carries the name back to us
        if struct.pack("<I", len(name)) + name.encode() + b"\0" in received:
            return "granted"


def _until_reply(sock: socket.socket, serial: int) -> None:
    """Read until the bus answers our call `serial` (a METHOD_RETURN or ERROR to it)."""
    want = struct.pack("<I", serial)
    received = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the bus closed the connection")
        received += chunk
        # the reply_serial header field: code 5, signature "u", padding, the serial
        if b"\x05\x01u\x00" + want in received:
            return


def signal(address: str, path: str, interface: str, member: str) -> str:
    """Send a signal as this user; return once the bus has routed it (it handles a
    connection's messages in order, and answers our GetId after the signal)."""
    sock = connect(address, message(2, 4, path, interface, member), method_call(3, "GetId"))
    _until_reply(sock, 3)
    sock.close()
    return "routed"


def _stdin_closed() -> bool:
    return bool(select.select([sys.stdin], [], [], 0)[0]) and not sys.stdin.readline()


def flood(
    address: str, destinations: list[str], path: str, iface: str, member: str, rate: int
) -> str:
    """Call member on path of each destination `rate` times a second, never reading a
    reply, until stdin closes; report how many calls went out (fewer than asked when
    the bus stopped reading us: sends block)."""
    sock = connect(address)
    _until_reply(sock, 1)  # Hello
    print("ready", flush=True)
    serial = 2
    started = time.monotonic()
    tick = 0
    while not _stdin_closed():
        tick += 1
        time.sleep(max(0.0, started + tick * FLOOD_TICK_S - time.monotonic()))
        calls = []
        for destination in destinations:
            for _ in range(round(rate * FLOOD_TICK_S)):
                calls.append(message(serial, 1, path, iface, member, destination=destination))
                serial += 1
        sock.sendall(b"".join(calls))
    elapsed = time.monotonic() - started
    return json.dumps({"sent": serial - 2, "seconds": round(elapsed, 1)})


def burst(
    address: str,
    destinations: list[str],
    path: str,
    iface: str,
    member: str,
    count: int,
    conns: int,
) -> str:
    """From `conns` connections, `count` pipelined calls to each destination, then
    read nothing until stdin closes."""
    socks = []
    for _ in range(conns):
        sock = connect(address)
        _until_reply(sock, 1)
        calls = [
            message(2 + i, 1, path, iface, member, destination=d)
            for d in destinations
            for i in range(count)
        ]
        sock.sendall(b"".join(calls))
        socks.append(sock)
    print("sent", flush=True)
    sys.stdin.read()
    for sock in socks:
        sock.close()
    return "done"


def main() -> None:
    command = sys.argv[1]
    if command == "own":
        print(own(sys.argv[2], sys.argv[3]), flush=True)
        return
    if command == "signal":
        print(signal(*sys.argv[2:6]), flush=True)
        return
    if command == "flood":
        address, dests, path, iface, member, rate = sys.argv[2:8]
        print(flood(address, dests.split(","), path, iface, member, int(rate)), flush=True)
        return
    if command == "burst":
        address, dests, path, iface, member, count, conns = sys.argv[2:9]
        print(
            burst(address, dests.split(","), path, iface, member, int(count), int(conns)),
            flush=True,
        )
        return
    address, readers, silent = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    subscribe = method_call(2, "AddMatch", RULE)
    reading = [connect(address, subscribe) for _ in range(readers)]
    idle = [connect(address, subscribe) for _ in range(silent)]
    counts = [0] * readers
    tails = [b""] * readers
    selector = selectors.DefaultSelector()
    for i, sock in enumerate(reading):
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, i)
    selector.register(sys.stdin, selectors.EVENT_READ, -1)
    print("ready", flush=True)
    while True:
        for key, _ in selector.select():
            if key.data == -1:
                if not sys.stdin.readline():
                    print(json.dumps(counts), flush=True)
                    for sock in reading + idle:
                        sock.close()
                    return
                continue
            i = key.data
            chunk = reading[i].recv(1 << 20)
            data = tails[i] + chunk
            counts[i] += data.count(MARKER)
            tails[i] = data[-(len(MARKER) - 1) :]


if __name__ == "__main__":
    main()
