"""A bound on glibc's malloc arenas for the metadata service's process.

glibc gives threads that contend for the allocator arenas of their own, up to eight per core.
The route thread pool's workers come and go (anyio ends one after 10 s idle), each new one lands
on some arena, and the multipart bodies, images and thumbnails they allocate leave free chunks
behind in every arena they touched, which glibc keeps rather than returns. Measured under a
soak-like mix (2 cores): the process's live heap stayed at about 40 MiB while free memory held in
the arenas grew from 29 to 52 MiB in four minutes (resident memory +15 %); with two arenas it
stayed at 5-8 MiB (resident memory +2 %).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

log = logging.getLogger(__name__)

# mallopt's parameter number for the arena limit (glibc's malloc.h).
_M_ARENA_MAX = -8


def limit_malloc_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas at ``arenas`` for the threads created from now on; call it
    before the service starts its threads. True if the cap was set. Nothing is done for 0, for
    a C library other than glibc, or when ``MALLOC_ARENA_MAX`` is in the environment (glibc
    applied the operator's value at start-up, and it stands)."""
    if arenas <= 0 or "MALLOC_ARENA_MAX" in os.environ or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if mallopt(_M_ARENA_MAX, arenas) != 1:
        log.warning("mallopt(M_ARENA_MAX, %d) failed; malloc keeps its default arenas", arenas)
        return False
    return True
