"""The host a task runs on: NVML, VRAM cap, GPU start throttle, process priority, processes.

May import: ``grid_flows.core``, other adapters, psutil, ray.
"""
