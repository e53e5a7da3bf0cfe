"""chipmunk-jax"""
