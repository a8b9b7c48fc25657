"""Test harnesses, not product code: emulated hosts (network namespaces, shaped links, an rsh agent).

    netemu   EmulatedHosts: 2-4 hosts on one machine for multi-host tests (root only)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import exports

__all__ = ["EmulatedHosts", "EmulationError", "unavailable"]

if TYPE_CHECKING:
    from .netemu import EmulatedHosts, EmulationError, unavailable

__getattr__ = exports(__name__, {
    "EmulatedHosts": "netemu", "EmulationError": "netemu", "unavailable": "netemu",
})
