"""Applications on top of the library: the ``chipmunk-jax`` CLI, the quality harness, the demo and the tiny
model we train and ship. Nothing in the library (pallas_kernels, the core, models, ports) imports them."""
