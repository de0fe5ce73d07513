"""Models bundled with maas_jax for demos and tests (MiniLM sentence encoder)."""
