"""Training data: the BFM face model (:mod:`.bfm`), voxelisation of aligned meshes into
VRN target volumes (:mod:`.voxelize`), synthetic faces (:mod:`.synthetic`) and the
300W-LP / AFLW2000-3D reader (:mod:`.aflw`)."""

from .voxelize import (DEPTH_SCALE, FRONT_MARGIN, THICKNESS, VOLUME_DEPTH, VOLUME_SIZE,
                       front_depth, top_map, volume_from_top, voxelize)

__all__ = ["DEPTH_SCALE", "FRONT_MARGIN", "THICKNESS", "VOLUME_DEPTH", "VOLUME_SIZE",
           "front_depth", "top_map", "volume_from_top", "voxelize"]
