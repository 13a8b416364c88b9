"""RoadRunner's RPC endpoint: Goridge RPC frames (`codec`), the methods by name (`registry`),
the asyncio server (`server`) and a client (`client`)."""

from mailpipe.rpc.registry import Registry, RPCError

__all__ = ["RPCError", "Registry"]
