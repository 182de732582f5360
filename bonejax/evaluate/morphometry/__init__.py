"""Bone morphometry: BV/TV, BS, Tb.Th, Tb.Sp, Tb.N, Conn.D, DA, SMI, Ct.Th, Ct.Ar/Tt.Ar in
micrometres on anisotropic voxels, per class and ROI, block by block (indices.py)."""

from bonejax.evaluate.morphometry.indices import (ASBMR, Cortical, Morphometry, compare,
                                                  cortical, measure)
from bonejax.evaluate.morphometry.inputs import Box

__all__ = ["ASBMR", "Box", "Cortical", "Morphometry", "compare", "cortical", "measure"]
