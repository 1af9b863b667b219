"""The float32 GPU mode switch (relattn.precision): values, scoping, errors."""

import threading

import pytest

import relattn


DEFAULT = "3xtf32"


def test_default_and_set():
    assert relattn.get_gpu_float32_mode() == DEFAULT
    relattn.set_gpu_float32_mode("tf32")
    try:
        assert relattn.get_gpu_float32_mode() == "tf32"
    finally:
        relattn.set_gpu_float32_mode(DEFAULT)
    assert relattn.get_gpu_float32_mode() == DEFAULT


def test_context_manager_restores_on_error():
    with pytest.raises(RuntimeError):
        with relattn.gpu_float32_mode("fma") as mode:
            assert mode == "fma" and relattn.get_gpu_float32_mode() == "fma"
            raise RuntimeError("inside")
    assert relattn.get_gpu_float32_mode() == DEFAULT


def test_mode_is_per_thread():
    seen = {}

    def worker():
        seen["before"] = relattn.get_gpu_float32_mode()
        relattn.set_gpu_float32_mode("tf32")
        seen["after"] = relattn.get_gpu_float32_mode()

    with relattn.gpu_float32_mode("fma"):
        th = threading.Thread(target=worker)
        th.start()
        th.join()
        assert relattn.get_gpu_float32_mode() == "fma"
    assert seen == {"before": DEFAULT, "after": "tf32"}


@pytest.mark.parametrize("bad", ["TF32", "bf16", "", None, 3])
def test_bad_modes_name_the_argument(bad):
    with pytest.raises((ValueError, TypeError), match="mode: expected one of"):
        relattn.set_gpu_float32_mode(bad)
    with pytest.raises((ValueError, TypeError), match="mode: expected one of"):
        with relattn.gpu_float32_mode(bad):
            pass
    assert relattn.get_gpu_float32_mode() == DEFAULT
