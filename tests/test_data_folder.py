"""User image folders and sample-folder manifests: loading, captions, classes, and one-line errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dmd_dar.data.folder import ImageFolderDataset
from dmd_dar.data.manifest import read_manifest, save_grid, save_png_folder, write_manifest
from dmd_dar.errors import UserError


def _img(path, w=20, h=10, color=(255, 0, 0), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (w, h), color).save(path)


def test_folder_loads_classes_captions_and_resizes(tmp_path):
    _img(tmp_path / "cats" / "a.png")
    _img(tmp_path / "cats" / "b.jpg", color=(0, 0, 255))
    _img(tmp_path / "dogs" / "c.webp", w=8, h=30, color=(0, 255, 0))
    _img(tmp_path / "dogs" / "d.png", color=128, mode="L")
    (tmp_path / "cats" / "b.txt").write_text("a blue cat\n")
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "cats/a.png", "caption": "a red cat"}) + "\n")
    ds = ImageFolderDataset(tmp_path, image_size=16)
    assert len(ds) == 4 and ds.class_names == ["cats", "dogs"]
    x, cid, cap = ds[0]
    assert x.shape == (3, 16, 16) and cid == 0 and cap == "a red cat"
    torch.testing.assert_close(x[:, 8, 8], torch.tensor([1.0, -1.0, -1.0]))
    assert ds[1][2] == "a blue cat" and ds[2][1] == 1 and ds[2][2] == ""
    assert ds[3][0].shape == (3, 16, 16)  # grayscale converted to RGB
    assert ImageFolderDataset(tmp_path, image_size=(8, 12))[2][0].shape == (3, 8, 12)
    with pytest.raises(UserError, match="dogs/c.webp"):
        ImageFolderDataset(tmp_path, 16, require_captions=True)


def test_folder_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope", 16)
    with pytest.raises(UserError, match="no images found"):
        ImageFolderDataset(tmp_path, 16)
    _img(tmp_path / "a.png")
    (tmp_path / "notes.md").write_text("hi")
    with pytest.raises(UserError, match=r"notes\.md is not an image.*on_invalid='skip'"):
        ImageFolderDataset(tmp_path, 16)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    ds = ImageFolderDataset(tmp_path, 16, on_invalid="skip")
    assert len(ds) == 2 and ds[0][1] == -1
    with pytest.raises(UserError, match=r"broken\.png"):
        ds[1]
    (tmp_path / "notes.md").unlink()
    with pytest.raises(UserError, match=r"cannot read image .*broken\.png"):
        ImageFolderDataset(tmp_path, 16, verify=True)
    assert len(ImageFolderDataset(tmp_path, 16, on_invalid="skip", verify=True)) == 1
    (tmp_path / "captions.jsonl").write_text("{bad json\n")
    with pytest.raises(UserError, match=r"captions\.jsonl:1"):
        ImageFolderDataset(tmp_path, 16, on_invalid="skip")
    with pytest.raises(UserError, match="captions file"):
        ImageFolderDataset(tmp_path, 16, on_invalid="skip", captions_file=tmp_path / "missing.jsonl")


def test_png_folder_and_manifest_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    recs = [{"seed": 10 + i, "class_id": i, "class_name": f"c{i}", "caption": f"cap {i}"} for i in range(3)]
    save_png_folder(images[:2], tmp_path, recs[:2])
    save_png_folder(images[2:], tmp_path, recs[2:], start_index=2)
    back = read_manifest(tmp_path)
    assert [r["file"] for r in back] == ["00000.png", "00001.png", "00002.png"]
    assert back[2] == {"file": "00002.png", "index": 2, **recs[2]}
    arr = np.asarray(Image.open(tmp_path / "00001.png"))
    expect = ((images[1].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert arr.shape == (8, 8, 3) and np.array_equal(arr, expect)
    save_grid(images, tmp_path / "grid.png", nrow=2)
    assert Image.open(tmp_path / "grid.png").size == (2 * 10 + 2, 2 * 10 + 2)


def test_manifest_errors(tmp_path):
    with pytest.raises(UserError, match="manifest.jsonl not found"):
        read_manifest(tmp_path)
    with pytest.raises(UserError, match="no 'file' key"):
        write_manifest(tmp_path, [{"index": 0}])
    (tmp_path / "manifest.jsonl").write_text('{"file": "00000.png"}\n{oops\n')
    with pytest.raises(UserError, match=r"manifest\.jsonl:1: image '00000\.png' is missing"):
        read_manifest(tmp_path)
    with pytest.raises(UserError, match=r"manifest\.jsonl:2: invalid JSON"):
        read_manifest(tmp_path, check_files=False)
    write_manifest(tmp_path, [{"file": "a.png"}, {"file": "a.png"}])
    with pytest.raises(UserError, match="listed twice"):
        read_manifest(tmp_path, check_files=False)
