"""Dagster resources, one per external system; ``stacks`` and ``ml`` configure them per target.

Modules are imported by name (``from resources.pulumi import PulumiStacks``): importing the
package imports none of them.
"""

__all__ = ["flyte", "kubernetes", "ml", "pulumi", "stacks", "weights"]
