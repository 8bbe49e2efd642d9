"""Detectron2's DatasetMapper with errors that name the image they come from."""
from detectron2.data import DatasetMapper

__all__ = ["SOLOv2DatasetMapper"]


class SOLOv2DatasetMapper(DatasetMapper):
    """
    Detectron2's :class:`DatasetMapper` (same config keys and arguments), except that an error
    while reading or transforming an image names its file: PIL's "image file is truncated", for
    one, does not, and a dataset may hold thousands of images.
    """

    def __call__(self, dataset_dict: dict) -> dict:
        """See :meth:`DatasetMapper.__call__`. Raises RuntimeError naming ``file_name``, with the
        original error as its cause."""
        try:
            return super().__call__(dataset_dict)
        except Exception as e:
            raise RuntimeError(
                f"Cannot load {dataset_dict.get('file_name')}: {type(e).__name__}: {e}"
            ) from e
