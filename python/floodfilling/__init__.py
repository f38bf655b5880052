"""floodfilling: Flood-Filling Networks for connectomics.

Exact reference inference (google/ffn semantics), a multi-subvolume engine, training
and MPI scale-out. Arrays are indexed (z, y, x) everywhere.
"""

__version__ = "0.1.0"
