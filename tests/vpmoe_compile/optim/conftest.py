import pytest


@pytest.fixture(scope="session")
def megatron_world():
    """torch.distributed (gloo, world size 1) + Megatron parallel state, once per session."""
    from megatron_base import destroy_process, init_process

    init_process(seed=1234)
    yield
    destroy_process()
