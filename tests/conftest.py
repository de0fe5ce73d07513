"""Shared test setup.

Eight fake CPU devices must be configured before any jax computation runs, so that the
sharding tests (shard_map bodies, meshes) run on a laptop or a 2-core CI machine.
"""

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", False)
