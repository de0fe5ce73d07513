"""Recipe files that ship with maas_jax (read them with ``maas_jax.recipe.load``).

>>> from importlib import resources
>>> from maas_jax import recipe
>>> recipe.load(resources.files("maas_jax.recipes") / "minilm-w8a8.toml")  # doctest: +ELLIPSIS
pipeline(fake_quant(rules=(QuantRule(where='_embeddings/embedding$', ...
"""
