"""Shared test set-up: CPU only, deterministic, one thread per test process (CI has 2 cores)."""

import pytest
import torch

from dmd_dar.data.manifest import save_png_folder

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def eval_folders():
    """``eval_folders(root, size)`` writes three tiny sample folders for evaluation tests (see below)."""
    return write_teacher_student_reference


def write_teacher_student_reference(root, size: int, n: int = 6) -> None:
    """Three tiny sample folders under ``root``: ``teacher`` (random images of classes fur / grass, seeds 0..n-1),
    ``student`` (the same images blurred, same manifest records: the two pair up) and ``ref`` (other random
    images with class names only: not pairable)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    recs = [{"seed": i, "class_id": i % 2, "class_name": ["fur", "grass"][i % 2]} for i in range(n)]
    save_png_folder(x, root / "teacher", recs)
    save_png_folder(torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False), root / "student", recs)
    save_png_folder(torch.rand(n, 3, size, size, generator=g) * 2 - 1, root / "ref",
                    [{"class_name": ["fur", "grass"][i % 2]} for i in range(n)])
