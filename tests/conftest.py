"""Test configuration: float64 available, strict dtype promotion, full float32 precision of
convolutions, a fixed hypothesis profile."""

import os

import jax
from hypothesis import HealthCheck, settings

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
# float32 convolutions and dots compare with PyTorch's CPU results at full precision on every
# backend: on recent NVIDIA GPUs XLA's default multiplies in TensorFloat-32 (README, "On GPUs"),
# which missed the conv gradient tests' 1e-5 tolerance by up to 4e-3 in some runs.
jax.config.update("jax_default_matmul_precision", "highest")

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=int(os.environ.get("JAXCONV_HYPOTHESIS_EXAMPLES", "25")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile("ci")
