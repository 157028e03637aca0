"""Device choice and CPU thread budgets (d2s_nerf_ros.device)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from d2s_nerf_ros.device import resolve_device, set_torch_threads


@pytest.mark.parametrize("threads", [1, 3])
def test_thread_budget_sets_both_torch_pools_in_a_fresh_process(threads: int):
    """Set before any inter-op work, as the node and d2s-nerf do at start-up (a process of its own:
    torch takes the inter-op size only once)."""
    code = (f"import torch; from d2s_nerf_ros.device import set_torch_threads; set_torch_threads({threads}); "
            "print(torch.get_num_threads(), torch.get_num_interop_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(threads), str(threads)]


def test_thread_budget_zero_leaves_torch_alone_and_bad_values_are_refused():
    import torch

    before = (torch.get_num_threads(), torch.get_num_interop_threads())
    set_torch_threads(0)
    assert (torch.get_num_threads(), torch.get_num_interop_threads()) == before
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="num_threads"):
            set_torch_threads(bad)


def test_cuda_without_a_gpu_is_a_clear_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the error cannot happen here")
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(RuntimeError, match="no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device("tpu")
