"""Datasets: the embedded procedural images, users' image folders, and sample folders with manifests."""

from dmd_dar.data.folder import ImageFolderDataset, load_image
from dmd_dar.data.manifest import read_manifest, save_grid, save_png_folder, write_manifest
from dmd_dar.data.procedural import CLASS_NAMES, COLOR_NAMES, NUM_CLASSES, PALETTE, ProceduralImages

__all__ = ["ProceduralImages", "CLASS_NAMES", "COLOR_NAMES", "NUM_CLASSES", "PALETTE", "ImageFolderDataset",
           "load_image", "read_manifest", "write_manifest", "save_png_folder", "save_grid"]
