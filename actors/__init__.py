"""Ray shells around the shard engine, the coordinator engine and the signer engine.

This is the only room that imports `ray`; the engines it wraps are plain asyncio classes.

A node that starts its own local Ray instance keeps all of Ray's traffic on loopback: Ray
otherwise binds its services to the machine's outward-facing address. Ray reads this switch
when it is first imported, so it is set here, before any module of this room imports ray,
unless the node is configured to join an existing cluster (`LEDGER_RAY_ADDRESS` or
`RAY_ADDRESS`), where nodes must reach each other.
"""

import os as _os

if not (_os.environ.get("LEDGER_RAY_ADDRESS") or _os.environ.get("RAY_ADDRESS")):
    _os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
