"""Many raw Snapshot subscribers in one process, for the flood test.

`python snapshot_subscribers.py ADDRESS READERS SILENT` opens READERS + SILENT
connections to the bus, each subscribed to Snapshot signals, prints "ready",
then reads (and discards) everything the READERS receive, counting Snapshot
messages by their member name in the byte stream — cheap enough that 19 readers
keep up where 19 decoding clients could not. SILENT connections never read.
When stdin closes it prints the counts as JSON.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import sys

from dbus_fast import Message

MARKER = b"\x08\x00\x00\x00Snapshot\x00"  # member header field: u32 length, "Snapshot"
RULE = "type='signal',interface='org.damond1.Context',member='Snapshot'"


def connect(address: str) -> socket.socket:
    path = dict(kv.split("=", 1) for kv in address.split(":", 1)[1].split(","))["path"]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    uid = str(os.getuid()).encode().hex()
    sock.sendall(b"\0AUTH EXTERNAL " + uid.encode() + b"\r\n")
    assert sock.recv(4096).startswith(b"OK"), "bus refused EXTERNAL auth"
    sock.sendall(b"BEGIN\r\n")
    for serial, msg in enumerate(
        [
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="Hello",
            ),
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="AddMatch",
                signature="s",
                body=[RULE],
            ),
        ],
        start=1,
    ):
        msg.serial = serial
        sock.sendall(msg._marshall(False))
    return sock


def main() -> None:
    address, readers, silent = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    reading = [connect(address) for _ in range(readers)]
    idle = [connect(address) for _ in range(silent)]
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
