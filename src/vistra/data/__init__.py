"""Data: image files -> checked, split, labelled samples -> tensors.

`scan_image_folder` finds classes and splits a folder, `ImageFolderDataset` with
`build_train_transform` / `build_eval_transform` turns the samples into tensors
(`eval_transform(model)`: the one a model's data config prescribes), `find_images`
lists the images of files and folders given to predict or explain, and
`export_fashion_mnist` / `bundled_demo_dir` provide a real dataset to try it all on.
"""

from vistra.data.fashion_mnist import (
    DEFAULT_SOURCE,
    FASHION_MNIST_CLASSES,
    bundled_demo_dir,
    export_fashion_mnist,
    load_fashion_mnist,
    read_idx,
)
from vistra.data.folder import (
    DatasetSplit,
    ImageFolderDataset,
    class_counts,
    find_images,
    format_class_counts,
    list_files,
    plot_class_counts,
    read_class_indices,
    scan_image_folder,
    write_class_indices,
)
from vistra.data.images import (
    IMAGE_EXTENSIONS,
    ImageLoadError,
    check_image,
    is_image_file,
    load_rgb,
    to_rgb,
)
from vistra.data.preprocess import Transform, eval_transform, eval_transform_for, fit_channels
from vistra.data.transforms import (
    EvalTransform,
    MixupCutmix,
    RandAugment,
    RandomErasing,
    TrainTransform,
    build_eval_transform,
    build_train_transform,
    smooth_one_hot,
    to_tensor_normalized,
)

__all__ = [
    "DEFAULT_SOURCE",
    "FASHION_MNIST_CLASSES",
    "IMAGE_EXTENSIONS",
    "DatasetSplit",
    "EvalTransform",
    "ImageFolderDataset",
    "ImageLoadError",
    "MixupCutmix",
    "RandAugment",
    "RandomErasing",
    "TrainTransform",
    "Transform",
    "build_eval_transform",
    "build_train_transform",
    "bundled_demo_dir",
    "check_image",
    "class_counts",
    "eval_transform",
    "eval_transform_for",
    "export_fashion_mnist",
    "find_images",
    "fit_channels",
    "format_class_counts",
    "is_image_file",
    "list_files",
    "load_fashion_mnist",
    "load_rgb",
    "plot_class_counts",
    "read_class_indices",
    "read_idx",
    "scan_image_folder",
    "smooth_one_hot",
    "to_rgb",
    "to_tensor_normalized",
    "write_class_indices",
]
