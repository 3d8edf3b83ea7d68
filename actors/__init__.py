"""Ray shells around the shard engine and the cross-shard coordinator.

This is the only room that imports `ray`; the engines it wraps are plain asyncio classes.
"""
