"""Training data: the BFM face model (:mod:`.bfm`), voxelisation of aligned meshes into
VRN target volumes (:mod:`.voxelize`), synthetic faces (:mod:`.synthetic`) and the
300W-LP / AFLW2000-3D reader (:mod:`.aflw`)."""

from .voxelize import (DEPTH_SCALE, FRONT_MARGIN, THICKNESS, VOLUME_DEPTH, VOLUME_SIZE,
                       column_runs, front_depth, volume_from_runs, voxelize)

__all__ = ["DEPTH_SCALE", "FRONT_MARGIN", "THICKNESS", "VOLUME_DEPTH", "VOLUME_SIZE",
           "column_runs", "front_depth", "volume_from_runs", "voxelize"]
