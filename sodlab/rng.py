"""The global random number generators' states as tensors and plain values.

A checkpoint carries them so that a resumed run draws what an uninterrupted one would. numpy's
own state holds an ndarray, which ``torch.load(weights_only=True)`` refuses to rebuild, so the
keys travel as an int64 tensor and python's state as a list.
"""
from __future__ import annotations

import random

import numpy as np
import torch


def rng_state() -> dict:
    """torch's, numpy's (legacy global) and python's RNG states, loadable with weights_only=True."""
    bit_generator, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"bit_generator": str(bit_generator), "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(position), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": {"version": int(version), "internal": [int(v) for v in internal], "gauss_next": gauss_next},
    }


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` returned; a malformed state is a ValueError."""
    try:
        torch_state = torch.as_tensor(state["torch"], dtype=torch.uint8)
        numpy_state = state["numpy"]
        keys = torch.as_tensor(numpy_state["keys"]).numpy()
        if keys.shape != (624,) or keys.min(initial=0) < 0 or keys.max(initial=0) >= 2**32:
            raise ValueError(f"numpy keys must be 624 values in [0, 2**32), got shape {keys.shape}")
        numpy_tuple = (numpy_state["bit_generator"], keys.astype(np.uint32), int(numpy_state["pos"]),
                       int(numpy_state["has_gauss"]), float(numpy_state["cached_gaussian"]))
        python = state["python"]
        python_tuple = (int(python["version"]), tuple(int(v) for v in python["internal"]), python["gauss_next"])
        random.setstate(python_tuple)
        np.random.set_state(numpy_tuple)
        torch.set_rng_state(torch_state)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise ValueError(f"not an RNG state written by sodlab.rng.rng_state: {e}") from None
