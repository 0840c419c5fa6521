"""A raw D-Bus client (standard library only) for the flood and policy tests.

`python rawbus.py own ADDRESS NAME` asks for a bus name and prints the bus's
answer: "granted" or the error name.

`python rawbus.py subscribe ADDRESS READERS SILENT` opens READERS + SILENT
connections to the bus, each subscribed to Snapshot signals, prints "ready",
then reads (and discards) everything the READERS receive, counting Snapshot
messages by their member name in the byte stream — cheap enough that 19 readers
keep up where 19 decoding clients could not. SILENT connections never read.
When stdin closes it prints the counts as JSON.

Standard library only (the two messages it sends are marshalled here), so it
runs under any Python 3 as any user, e.g. as `nobody` through setpriv.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import struct
import sys

MARKER = b"\x08\x00\x00\x00Snapshot\x00"  # member header field: u32 length, "Snapshot"
RULE = "type='signal',interface='org.damond1.Context',member='Snapshot'"


def _pad(buf: bytearray, n: int) -> None:
    buf += b"\0" * (-len(buf) % n)


def _string(buf: bytearray, text: str) -> None:
    _pad(buf, 4)
    data = text.encode()
    buf += struct.pack("<I", len(data)) + data + b"\0"


def method_call(serial: int, member: str, *args: str | int) -> bytes:
    """A little-endian METHOD_CALL to the bus daemon; args are strings or uint32s."""
    fields = bytearray()  # starts at offset 16, so 8-alignment here is alignment there
    headers = [
        (1, "o", "/org/freedesktop/DBus"),
        (2, "s", "org.freedesktop.DBus"),
        (3, "s", member),
        (6, "s", "org.freedesktop.DBus"),
    ]
    signature = "".join("s" if isinstance(a, str) else "u" for a in args)
    if args:
        headers.append((8, "g", signature))
    for code, kind, value in headers:
        _pad(fields, 8)
        fields += bytes([code, 1]) + kind.encode() + b"\0"
        if kind == "g":
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
    header = bytearray(struct.pack("<cBBBIII", b"l", 1, 0, 1, len(body), serial, len(fields)))
    header += fields
    _pad(header, 8)
    return bytes(header + body)


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


def main() -> None:
    if sys.argv[1] == "own":
        print(own(sys.argv[2], sys.argv[3]), flush=True)
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
