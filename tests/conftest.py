"""Shared test setup.

Eight fake CPU devices must be configured before any jax computation runs, so that the
sharding tests (shard_map bodies, meshes) run on a laptop or a 2-core CI machine.
"""

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", False)

# Keras 3 picks its backend at import time: the third-party model tests use the JAX one.
import os  # noqa: E402

os.environ.setdefault("KERAS_BACKEND", "jax")
