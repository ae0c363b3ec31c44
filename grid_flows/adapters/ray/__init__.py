"""Ray: grid nodes by label, boosts as placement groups, task options, node metrics.

May import: ``grid_flows.core``, other adapters, ray.
"""
