"""Networking: the libp2p host, node identity, and the trio/asyncio bridge."""
