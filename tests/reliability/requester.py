"""A requesting process for the reliability tests: request, then release, N times.

Run as ``python -m tests.reliability.requester N OUT`` with RAY_ADDRESS and PREFECT_API_URL
set; the last boost is left live. Writes one JSON line per outcome to OUT (``granted``/``no_capacity``/``error``), so
the test can judge every boost it was given; an unexpected error ends the loop.
"""

from __future__ import annotations

import json
import sys


def main(rounds: int, out_path: str) -> int:
    from grid_flows import release_boost, request_boost
    from grid_flows.errors import NoCapacity

    with open(out_path, "a", buffering=1) as out:
        for round_ in range(rounds):
            try:
                boost = request_boost("gpu-master", cpu=0.5, duration=600)
            except NoCapacity:
                out.write(json.dumps({"outcome": "no_capacity"}) + "\n")
                continue
            except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
                out.write(json.dumps({"outcome": "error", "error": f"{type(exc).__name__}: {exc}"}) + "\n")
                return 1
            out.write(json.dumps({"outcome": "granted", "id": boost.id}) + "\n")
            if round_ < rounds - 1:  # the last one stays live for the reconciler to judge
                try:
                    release_boost(boost.id)
                except Exception as exc:  # noqa: BLE001
                    out.write(json.dumps({"outcome": "error", "error": f"release: {type(exc).__name__}: {exc}"}) + "\n")
                    return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), sys.argv[2]))
