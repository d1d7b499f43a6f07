"""Photos -> region features ``[N, R, D]`` in the SCAN precomp layout (grid cells of an ImageNet CNN).

    from hsc_pyg.features import extract_features
    extract_features("photos/", "data/my_precomp", "test")     # test_ims.npy [N, 36, 1280], boxes, ids

Backbones are chosen by name (:func:`build_backbone`, :func:`register_backbone`); the default
``efficientnet_lite0`` works offline. The command line is ``python -m hsc_pyg.features``.
"""
from .backbones import NORMALIZATIONS, Backbone, Normalization, backbone_names, build_backbone, register_backbone
from .extract import Extraction, cell_boxes, extract_features, grid_features, list_photos
from .images import photo_tensor, to_rgb

__all__ = ["NORMALIZATIONS", "Backbone", "Extraction", "Normalization", "backbone_names", "build_backbone", "cell_boxes", "extract_features",
           "grid_features", "list_photos", "photo_tensor", "register_backbone", "to_rgb"]
