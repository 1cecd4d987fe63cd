"""The gateway: the hub, its storage, its web skin, configuration and the command line.

See docs/architecture.md for its parts and who may import whom.
"""
