"""What an exported file records about itself: the model's name, classes and preprocessing,
the image sizes its graph computes right, the source checkpoint's hash and the quantisation
(with, for static int8, the number of calibration images) and the explain method measured
for the model, if one was (its card's `ExplainChoice`, as a checkpoint stores it), as ONNX
metadata_props (values as JSON under `vistra.*`)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from vistra.models import DataConfig, ExplainChoice


@dataclass(frozen=True)
class OnnxMetadata:
    """What an exported file records about itself (ONNX metadata_props, values as JSON)."""

    name: str
    classes: list[str] | None
    data_config: DataConfig
    in_chans: int
    size_multiple: int  # 0: only data_config.img_size; n: heights and widths divisible by n
    min_size: int  # the smallest height and width the graph computes right
    source_sha256: str
    quantization: str = "none"
    calibration_images: int = 0  # static int8: the images its activation ranges come from
    explain: ExplainChoice | None = None  # the source checkpoint's card's record, if any

    def to_props(self) -> dict[str, str]:
        dc = self.data_config
        values = {"name": self.name, "classes": self.classes, "img_size": list(dc.img_size),
                  "mean": list(dc.mean), "std": list(dc.std), "crop_pct": dc.crop_pct,
                  "interpolation": dc.interpolation, "in_chans": self.in_chans,
                  "size_multiple": self.size_multiple, "min_size": self.min_size,
                  "source_sha256": self.source_sha256,
                  "quantization": self.quantization,
                  "calibration_images": self.calibration_images}
        if self.explain is not None:  # a file without a record has no entry, as before
            values["explain"] = self.explain.to_dict()
        return {f"vistra.{k}": json.dumps(v) for k, v in values.items()}

    @classmethod
    def from_props(cls, props: dict[str, str], path: str | os.PathLike = "file"
                   ) -> OnnxMetadata:
        if "vistra.name" not in props:
            raise ValueError(f"{path} has no vistra metadata; export it with `vistra export`")
        v = {k.removeprefix("vistra."): json.loads(s) for k, s in props.items()
             if k.startswith("vistra.")}
        dc = DataConfig(img_size=tuple(v["img_size"]), mean=tuple(v["mean"]),
                        std=tuple(v["std"]), crop_pct=v["crop_pct"],
                        interpolation=v["interpolation"])
        try:  # the record is checked as a checkpoint's is: the file is not trusted
            explain = None if v.get("explain") is None else ExplainChoice.from_dict(v["explain"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path} has a damaged explain record ({err}); export it again "
                             "with `vistra export`") from err
        return cls(v["name"], v["classes"], dc, v["in_chans"], v["size_multiple"],
                   v["min_size"], v["source_sha256"], v.get("quantization", "none"),
                   v.get("calibration_images", 0), explain)

    def check_size(self, height: int, width: int) -> None:
        """Raise ValueError naming the supported sizes when the graph cannot take this one."""
        h, w = self.data_config.img_size
        if self.size_multiple == 0:
            if (height, width) != (h, w):
                raise ValueError(f"this ONNX graph of {self.name} takes {h}x{w} images only, "
                                 f"got {height}x{width}; resize the input")
            return
        if (height % self.size_multiple or width % self.size_multiple
                or min(height, width) < self.min_size):
            raise ValueError(
                f"this ONNX graph of {self.name} takes heights and widths that are multiples "
                f"of {self.size_multiple} and at least {self.min_size}, got {height}x{width}")


def read_onnx_metadata(path: str | os.PathLike) -> OnnxMetadata:
    """The vistra metadata of an exported .onnx file (reads the graph header, not weights)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return OnnxMetadata.from_props({p.key: p.value for p in model.metadata_props}, path)
