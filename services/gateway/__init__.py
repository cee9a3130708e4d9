"""Gateway: the only public door. Verifies tokens, caches, and orchestrates the other services."""
