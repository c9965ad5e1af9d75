"""Datasets, list files and generated data."""
from .datasets import IMAGE_SUFFIXES, ImageDataset, Listing, load_image, read_image_folder, read_list_file, read_split

__all__ = ["IMAGE_SUFFIXES", "ImageDataset", "Listing", "load_image", "read_image_folder", "read_list_file", "read_split"]
