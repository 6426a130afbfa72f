"""HyperSTE methods (SPEC §3): one module per method, dispatched by ``HyperSTE(method=...)``."""
