"""Dagster resources, one per external system; ``deployment`` configures them per target.

Modules are imported by name (``from resources.pulumi import PulumiStacks``): importing the
package imports none of them.
"""

__all__ = ["deployment", "flyte", "git", "kubernetes", "pulumi", "weights"]
