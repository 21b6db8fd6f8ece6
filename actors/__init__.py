"""The blueprint pipeline on Ray: Urza, Karn, Tezzeret, Urabrask, and how to reach them.

Roles (one named actor each, in ``ActorsConfig.namespace``):

- ``urza``      the library: stores every blueprint entry, persists it, publishes the
                versioned catalogue of ready blueprints (``actors/urza.py``);
- ``karn``      the generator: proposes new specs (``actors/karn.py``);
- ``tezzeret``  the compiler: validates, contract-checks and compiles each submitted spec
                on its own queue (``actors/tezzeret.py``);
- ``urabrask``  the crucible: benchmarks and hazard-probes each built blueprint
                (``actors/urabrask.py``).

A trainer never talks to the actors directly: it polls an ``UrzaCatalogue``
(``actors/client.py``), which never blocks. ``actors/launch.py`` starts (or finds) the
actors with the resources the config asks for.

The names and ``Peer`` (a handle to a named actor that looks the actor up again after
it was replaced) live in ``actors/client.py`` and are re-exported here. The actor
modules import them from there, not from this package: an editable install made before
this file existed registers ``actors`` as a namespace package, and then this file never
runs (reinstall with ``pip install -e .`` to fix that).
"""

from __future__ import annotations

# Ray's usage statistics are turned off where the project starts Ray (esper_ray.cluster.ensure_ray),
# not as a side effect of importing this package.
from actors.client import ACTOR_NAMES, KARN, TEZZERET, URABRASK, URZA, Peer

__all__ = ["ACTOR_NAMES", "KARN", "Peer", "TEZZERET", "URABRASK", "URZA"]
