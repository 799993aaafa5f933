"""crackmap's domain library: survey imagery in, crack lines out (no Prefect, no torch at import)."""
