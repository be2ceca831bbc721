"""Training on an image folder: `train(TrainConfig(...))`, `resume(run_dir)`.

    from vistra.train import TrainConfig, train
    result = train(TrainConfig(data="flowers/", model="vit_base_patch16_224",
                               weights="vit_b16.npz", epochs=10, freeze_layers=True))
"""

from .config import TrainConfig, config_from_dict, load_config
from .loop import TrainResult, resume, train

__all__ = ["TrainConfig", "TrainResult", "config_from_dict", "load_config", "resume", "train"]
