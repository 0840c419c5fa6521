"""Client-side tools: the demo, the D-Bus client, private buses, workloads.

They use the daemon over D-Bus (or start it); the daemon (cli.py, bus.py,
hierarchy.py, monitor/) never imports them.
"""
