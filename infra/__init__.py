"""Pulumi programs (functions of an inventory entry) and the twin's Go toolchain recipe.

Modules are imported by name (``from infra.cluster import cluster_program``): importing the
package imports none of them, and none imports Pulumi before a program runs.
"""

__all__ = ["cluster", "mesh", "toolchain"]
