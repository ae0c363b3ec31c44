"""Adapters: the I/O that carries out the core's decisions (Ray, Prefect, the host).

May import: ``grid_flows.core``, ``grid_flows.errors``, other adapters, and ray, prefect, psutil.
"""
