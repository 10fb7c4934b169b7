"""samless.training: SAM-guided prompt learning (phase 1), SAM-free aggregator training (phase 2),
evaluation, export to model packages, and synthetic MS phantoms.

The only part of samless that imports segment_anything (and only in phase 1).
"""
