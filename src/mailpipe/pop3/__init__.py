"""POP3 server over the store (issue 15): protocol.py is the sans-I/O core, server.py its
asyncio listener."""
