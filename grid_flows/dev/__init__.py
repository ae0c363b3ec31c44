"""Development helpers: the demo and a local Prefect server.

May import: anything in ``grid_flows``.
"""
