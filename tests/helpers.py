"""Test helpers shared by several test files."""
import numpy as np


def write_cifar_binary(folder, files, records, label_bytes, seed=0):
    """Write CIFAR's binary format by hand: per record, label byte(s) then 3×32×32 pixels."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in files:
        labels = rng.integers(0, 10, size=(records, label_bytes), dtype=np.uint8)
        pixels = rng.integers(0, 256, size=(records, 3 * 32 * 32), dtype=np.uint8)
        (folder / name).write_bytes(np.concatenate([labels, pixels], axis=1).tobytes())
        written[name] = (labels, pixels.reshape(records, 3, 32, 32))
    return written
