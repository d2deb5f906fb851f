"""The rules that span inventory entries, the ones the owner's documents broke.

Each rule is a function of a structurally valid :class:`Inventory` that yields
``(path, reason)`` pairs, ``path`` being the tuple of keys to the offending field.
:func:`check` runs them all; the loader turns the paths into YAML lines.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

from homelab_dagster.gpus import (
    GPU_MEMORY_GIB,
    ServingNeed,
    TrainingNeed,
    gpu_memory_utilization,
    model_size,
)
from homelab_dagster.inventory import Cluster, Endpoint, Inventory, Model, check_label

__all__ = ["CPU_HEAD_SIZES", "RULES", "Finding", "check"]

Path = tuple[str | int, ...]
Finding = tuple[Path, str]


def _networks_disjoint(inv: Inventory) -> Iterator[Finding]:
    ranges = [
        (name, field, getattr(cluster.network, field))
        for name, cluster in inv.clusters.items()
        for field in ("pod_cidr", "service_cidr")
    ]
    for (c1, f1, n1), (c2, f2, n2) in itertools.combinations(ranges, 2):
        if n1.overlaps(n2):
            yield (
                ("clusters", c2, "network", f2),
                f"{f2} {n2} of cluster {c2!r} overlaps {f1} {n1} of cluster {c1!r}",
            )


def _node_ports(inv: Inventory) -> Iterator[Finding]:
    for name, cluster in inv.clusters.items():
        seen: dict[int, Path] = {}
        allocations: list[tuple[Path, int, str]] = [
            (("clusters", name, "node_ports", svc, "port"), np.port, np.category)
            for svc, np in cluster.node_ports.items()
        ]
        allocations += [
            (("endpoints", ep_name, "node_port"), ep.node_port, ep.port_category)
            for ep_name, ep in inv.endpoints.items()
            if ep.cluster == name and ep.node_port is not None
        ]
        for path, port, category in allocations:
            bounds = inv.port_ranges.get(category)
            if bounds is None:
                known = ", ".join(sorted(inv.port_ranges)) or "none declared"
                yield path, f"port category {category!r} is not in port_ranges ({known})"
            elif not bounds[0] <= port <= bounds[1]:
                yield (
                    path,
                    f"NodePort {port} is outside the {category!r} range {bounds[0]}-{bounds[1]}",
                )
            if port in seen:
                other = ".".join(map(str, seen[port]))
                yield path, f"NodePort {port} is used twice in cluster {name!r} (also at {other})"
            else:
                seen[port] = path
    for category, (low, high) in inv.port_ranges.items():
        if low > high:
            yield ("port_ranges", category), f"range {low}-{high} is empty (low above high)"


def _api_ports(inv: Inventory) -> Iterator[Finding]:
    by_host: dict[tuple[str, int], str] = {}
    for name, cluster in inv.clusters.items():
        key = (cluster.host, cluster.api_port)
        if key in by_host:
            yield (
                ("clusters", name, "api_port"),
                f"API port {cluster.api_port} is already used by cluster {by_host[key]!r} "
                f"on the same host {cluster.host!r}",
            )
        else:
            by_host[key] = name


def _mesh_links(inv: Inventory) -> Iterator[Finding]:
    seen: set[tuple[str, str]] = set()
    for i, link in enumerate(inv.mesh.links):
        path: Path = ("mesh", "links", i)
        for field, cluster in (("from", link.source), ("to", link.target)):
            if cluster not in inv.clusters:
                yield (*path, field), f"mesh link refers to unknown cluster {cluster!r}"
        if link.source == link.target:
            yield path, f"mesh link from {link.source!r} to itself"
        if (link.source, link.target) in seen:
            yield path, f"duplicate mesh link {link.source} -> {link.target}"
        seen.add((link.source, link.target))


def _cluster_entries(inv: Inventory) -> Iterator[Finding]:
    for name, cluster in inv.clusters.items():
        for i, component in enumerate(cluster.components):
            if component not in inv.components:
                yield (
                    ("clusters", name, "components", i),
                    f"unknown component {component!r} (not in the top-level components)",
                )
        names: set[str] = set()
        for node in cluster.expanded_nodes():
            if node.name in names:
                yield ("clusters", name, "nodes"), f"node name {node.name!r} is used twice"
            names.add(node.name)
        for i, pool in enumerate(cluster.nodes):
            for key, value in {"role": pool.role, **pool.labels}.items():
                reason = check_label(key, value)
                if reason:
                    field = "role" if key == "role" else "labels"
                    yield ("clusters", name, "nodes", i, field), reason
        for namespace in cluster.quotas:
            if namespace not in cluster.namespaces:
                yield (
                    ("clusters", name, "quotas", namespace),
                    f"quota for namespace {namespace!r}, which {name!r} does not declare",
                )


def _gpu_fit(cluster: Cluster, role: str) -> tuple[int, str | None, int]:
    """(nodes with the role, the name of the one with most GPUs, its GPU count)."""
    nodes = [n for n in cluster.expanded_nodes() if n.role == role]
    if not nodes:
        return 0, None, 0
    best = max(nodes, key=lambda n: n.gpus)
    return len(nodes), best.name, best.gpus


def _training_runs(inv: Inventory) -> Iterator[Finding]:
    for name, run in inv.training_runs.items():
        path: Path = ("training_runs", name)
        model = inv.models.get(run.model)
        if model is None:
            yield (*path, "model"), f"unknown model {run.model!r}"
        elif model.source != "trained":
            yield (*path, "model"), f"model {run.model!r} is external; only trained models train"
        cluster = inv.clusters.get(run.cluster)
        if cluster is None:
            yield (*path, "cluster"), f"unknown cluster {run.cluster!r}"
            continue
        if cluster.gpu_total() == 0:
            yield (*path, "cluster"), f"cluster {run.cluster!r} has no GPU nodes to train on"
            continue
        count, best, gpus = _gpu_fit(cluster, run.node_role)
        if count == 0:
            yield (
                (*path, "node_role"),
                f"cluster {run.cluster!r} has no node with role {run.node_role!r}",
            )
        elif run.gpus_per_node > gpus:
            yield (
                (*path, "gpus_per_node"),
                f"asks {run.gpus_per_node} GPUs per node, but the {run.node_role!r} node with the "
                f"most GPUs on {run.cluster!r} ({best}) has {gpus}",
            )
        elif run.nodes > count:
            yield (
                (*path, "nodes"),
                f"asks {run.nodes} nodes, but {run.cluster!r} has {count} "
                f"with role {run.node_role!r}",
            )
        if run.nodes > 1 and inv.ml.launcher == "flyte":
            yield (
                (*path, "nodes"),
                f"asks {run.nodes} nodes, but ml.launcher 'flyte' trains in one pod (Flyte's "
                "elastic PyTorch plugin is not used); ml.launcher 'pods' runs a pod per node",
            )


def _endpoints(inv: Inventory) -> Iterator[Finding]:
    for name, ep in inv.endpoints.items():
        path: Path = ("endpoints", name)
        if ep.model not in inv.models:
            yield (*path, "model"), f"unknown model {ep.model!r}"
        cluster = inv.clusters.get(ep.cluster)
        if cluster is None:
            yield (*path, "cluster"), f"unknown cluster {ep.cluster!r}"
            continue
        count, best, gpus = _gpu_fit(cluster, ep.node_role)
        if count == 0:
            yield (
                (*path, "node_role"),
                f"cluster {ep.cluster!r} has no node with role {ep.node_role!r}",
            )
        elif ep.accelerator == "cpu":
            if ep.tensor_parallel_size > 1:
                yield (
                    (*path, "tensor_parallel_size"),
                    "a cpu endpoint runs one process per replica: tensor-parallel size must be 1",
                )
        elif ep.tensor_parallel_size > gpus:
            yield (
                (*path, "tensor_parallel_size"),
                f"tensor-parallel size {ep.tensor_parallel_size} exceeds the GPUs of every "
                f"{ep.node_role!r} node on {ep.cluster!r}: "
                f"the one with the most, {best}, has {gpus}",
            )
        if ep.namespace not in cluster.namespaces:
            yield (
                (*path, "namespace"),
                f"namespace {ep.namespace!r} is not declared on {ep.cluster!r}",
            )
        model = inv.models.get(ep.model)
        if model is not None:
            yield from _servable(name, ep, ep.model, model)


def _endpoint_gpus(inv: Inventory) -> Iterator[Finding]:
    """The endpoints on one cluster's nodes of one role hold, together, at most those nodes'
    GPUs (a GPU is a whole device to Kubernetes: the one that does not fit stays Pending)."""
    wanted: dict[tuple[str, str], list[str]] = {}
    for name, ep in inv.endpoints.items():
        if ep.gpus and ep.cluster in inv.clusters:
            # One that fits no node at all is _endpoints' finding already.
            _, _, most = _gpu_fit(inv.clusters[ep.cluster], ep.node_role)
            if ep.gpus <= most:
                wanted.setdefault((ep.cluster, ep.node_role), []).append(name)
    for (cluster, role), names in wanted.items():
        have = sum(n.gpus for n in inv.clusters[cluster].expanded_nodes() if n.role == role)
        asks = {n: inv.endpoints[n].gpus * inv.endpoints[n].replicas for n in names}
        if sum(asks.values()) > have:
            each = ", ".join(f"{n} {g}" for n, g in asks.items())
            yield (
                ("endpoints", names[-1], "tensor_parallel_size"),
                f"the endpoints on {cluster!r}'s {role!r} nodes ask {sum(asks.values())} GPUs "
                f"({each}) and those nodes have {have}: one would stay Pending (serve a small "
                "model with accelerator: cpu, or move an endpoint)",
            )


def _gpu_pools(cluster: Cluster, role: str, gpus: int) -> list[tuple[int, str]]:
    """(pool index, product) of each GPU product of the ``role`` pools whose nodes have at
    least ``gpus`` GPUs (where a replica or a rank may land): unknown products first, then
    the smallest memory first (the one that decides whether it fits)."""
    first: dict[str, int] = {}
    for i, pool in enumerate(cluster.nodes):
        if pool.role == role and pool.gpu and pool.gpu.count >= gpus:
            first.setdefault(pool.gpu.product, i)
    return sorted(
        ((i, product) for product, i in first.items()),
        key=lambda entry: GPU_MEMORY_GIB.get(entry[1], -1.0),
    )


def _unknown_gpu(cluster: str, pool: int, product: str, what: str) -> Finding:
    return (
        ("clusters", cluster, "nodes", pool, "gpu", "product"),
        f"GPU product {product!r} has no known memory, so whether {what} fits on it cannot be "
        "checked: add the product and its memory in GiB to GPU_MEMORY_GIB "
        "(homelab_dagster/gpus.py)",
    )


def _no_size(model: str, what: str) -> Finding:
    return (
        ("models", model, "parameters"),
        f"model {model!r} declares no parameters, so whether {what} fits its GPUs cannot be "
        "checked: declare them (e.g. 70B)",
    )


def _endpoint_fit(inv: Inventory) -> Iterator[Finding]:
    """A GPU endpoint's replica fits the memory vLLM may take of its GPUs (gpus.ServingNeed)."""
    for name, ep in inv.endpoints.items():
        model, cluster = inv.models.get(ep.model), inv.clusters.get(ep.cluster)
        if ep.accelerator != "gpu" or model is None or cluster is None:
            continue
        pools = _gpu_pools(cluster, ep.node_role, ep.tensor_parallel_size)
        if not pools:
            continue  # it fits no node at all: _endpoints' finding
        try:
            share = gpu_memory_utilization(ep.extra_args)
        except ValueError as exc:
            yield ("endpoints", name, "extra_args"), str(exc)
            continue
        size = model_size(model)
        if size is None:
            yield _no_size(ep.model, f"endpoint {name!r}")
            continue
        need = ServingNeed(size.parameters, model.dtype, ep.tensor_parallel_size)
        for pool, product in pools:
            memory = GPU_MEMORY_GIB.get(product)
            if memory is None:
                yield _unknown_gpu(ep.cluster, pool, product, f"endpoint {name!r}")
                continue
            budget = memory * ep.tensor_parallel_size * share
            if need.total_gib > budget:
                yield (
                    ("endpoints", name, "model"),
                    f"{need.explain(ep.model)}; {ep.tensor_parallel_size} x {product} give "
                    f"{budget:.1f} GiB at {share:g} utilisation: serve a quantised checkpoint "
                    "(a smaller dtype), on more or larger GPUs, or a smaller model",
                )
            break  # the smallest known product decides


def _training_fit(inv: Inventory) -> Iterator[Finding]:
    """One GPU of a training run holds the model, its optimizer state and the activations of
    its slice of the batch (gpus.TrainingNeed; data parallel, every rank holds all of it)."""
    for name, run in inv.training_runs.items():
        model, cluster = inv.models.get(run.model), inv.clusters.get(run.cluster)
        if model is None or model.source != "trained" or cluster is None:
            continue
        pools = _gpu_pools(cluster, run.node_role, run.gpus_per_node)
        if not pools:
            continue  # no node has gpus_per_node GPUs: _training_runs' finding
        size = model_size(model)
        if size is None:
            yield _no_size(run.model, f"training run {name!r}")
            continue
        need = TrainingNeed(size, run.hyperparameters, run.nodes * run.gpus_per_node)
        for pool, product in pools:
            memory = GPU_MEMORY_GIB.get(product)
            if memory is None:
                yield _unknown_gpu(run.cluster, pool, product, f"training run {name!r}")
                continue
            if need.total_gib > memory:
                yield (
                    ("training_runs", name, "hyperparameters"),
                    f"{need.explain(run.model)}; one {product} has {memory:.1f} GiB: train "
                    "with lora_rank, a smaller batch_size or seq_len, or on more or larger GPUs",
                )
            break  # the smallest known product decides


# The head widths (n_embd / n_head) that vLLM's CPU attention kernel computes, the runtime of
# the twin's endpoints (vLLM 0.32, vllm/v1/attention/backends/cpu_attn.py,
# CPUAttentionBackend.get_supported_head_sizes). A model with another width loads, then fails.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def _servable(name: str, ep: Endpoint, model_name: str, model: Model) -> Iterator[Finding]:
    """Whether the runtime can serve ``model`` as endpoint ``name`` declares it: the twin's
    architecture (what the twin trains and serves) against vLLM's CPU kernel and its positions."""
    arch = model.architecture
    if arch is None:
        return
    where = ("models", model_name, "architecture", "n_head")
    if arch.n_embd % arch.n_head == 0:
        width = arch.n_embd // arch.n_head
        if width not in CPU_HEAD_SIZES:
            fits = [
                f"n_head {arch.n_embd // w} -> {w}"
                for w in CPU_HEAD_SIZES
                if arch.n_embd % w == 0 and w < arch.n_embd
            ]
            yield (
                where,
                f"head width n_embd {arch.n_embd} / n_head {arch.n_head} = {width}, which vLLM's "
                f"CPU attention (the twin's runtime, serving endpoint {name!r}) does not "
                f"support (it supports {', '.join(map(str, CPU_HEAD_SIZES))})"
                + (f"; e.g. {fits[0]}" if fits else ""),
            )
    else:
        yield where, f"n_embd {arch.n_embd} is not a multiple of n_head {arch.n_head}"
    if ep.max_model_len > arch.n_positions:
        yield (
            ("endpoints", name, "max_model_len"),
            f"max_model_len {ep.max_model_len} exceeds the {arch.n_positions} positions of "
            f"model {model_name!r} (architecture.n_positions): vLLM refuses to start",
        )


def _models(inv: Inventory) -> Iterator[Finding]:
    for name, model in inv.models.items():
        if model.source == "trained" and model.architecture is None:
            yield ("models", name, "architecture"), "a trained model needs an architecture"
        if model.source == "external" and not model.base_model:
            yield ("models", name, "base_model"), "an external model needs base_model (what it is)"


def _orchestrator(inv: Inventory) -> Iterator[Finding]:
    where = inv.orchestrator
    cluster = inv.clusters.get(where.cluster)
    if cluster is None:
        yield ("orchestrator", "cluster"), f"unknown cluster {where.cluster!r}"
        return
    if not any(n.role == where.node_role for n in cluster.expanded_nodes()):
        yield (
            ("orchestrator", "node_role"),
            f"cluster {where.cluster!r} has no node with role {where.node_role!r} "
            "for Dagster's pods",
        )


# Real twin nodes (``twin: real``): each runs a kubelet and containerd on the one machine that
# runs the twin (about 150 MiB and their share of its CPUs, besides the pods), and takes one
# of the two spare ports of its cluster's port block for its address (homelab_dagster.twin_real).
# Three, measured on the 2-core 24 GiB machine with all five clusters, the three real nodes, the
# vLLM pod and a two-rank training pod at once (docs/twin.md, "Cost").
MAX_REAL_NODES = 3
MAX_REAL_NODES_PER_CLUSTER = 2


def _real_nodes(inv: Inventory) -> Iterator[Finding]:
    real = 0
    for name, cluster in inv.clusters.items():
        in_cluster = 0
        for i, pool in enumerate(cluster.nodes):
            if pool.twin != "real":
                continue
            real += 1
            in_cluster += pool.count
            if real > MAX_REAL_NODES:
                yield (
                    ("clusters", name, "nodes", i, "twin"),
                    f"at most {MAX_REAL_NODES} nodes may be real on the twin (this is real node "
                    f"number {real}): each runs a kubelet and containerd on the one machine that "
                    "runs the twin, whose 2 cores and memory also hold five control planes; "
                    "leave the others fake (KWOK nodes)",
                )
            elif in_cluster > MAX_REAL_NODES_PER_CLUSTER:
                yield (
                    ("clusters", name, "nodes", i, "twin"),
                    f"at most {MAX_REAL_NODES_PER_CLUSTER} nodes of a cluster may be real on the "
                    f"twin ({name!r} would have {in_cluster}): a cluster's port block has two "
                    "spare ports, one per real node's address",
                )


RULES: tuple[Callable[[Inventory], Iterator[Finding]], ...] = (
    _networks_disjoint,
    _node_ports,
    _api_ports,
    _mesh_links,
    _cluster_entries,
    _models,
    _training_runs,
    _endpoints,
    _endpoint_gpus,
    _endpoint_fit,
    _training_fit,
    _orchestrator,
    _real_nodes,
)


def check(inv: Inventory) -> list[Finding]:
    """Every finding of every rule, in rule order."""
    return [finding for rule in RULES for finding in rule(inv)]
