"""Clusters: connected components of the verified near-duplicate edges (a vectorized union-find over
integer node ids), and the keep policy inside each component (see `greedy_clusters`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from curate.dedup.banding import sorted_unique

def connected_components(node_count: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Component label (its smallest node) of every node, by vectorized union-find: hook each edge's
    larger root under the smaller, then pointer-jump until every node points at its root; repeat
    until no edge spans two roots. (scipy.sparse.csgraph does the same, but importing it costs more
    than running this on a dedup graph.)"""
    parent = np.arange(node_count, dtype=np.int64)
    while True:
        root_left, root_right = parent[left], parent[right]
        low, high = np.minimum(root_left, root_right), np.maximum(root_left, root_right)
        spanning = low != high
        if not spanning.any():
            return parent
        np.minimum.at(parent, high[spanning], low[spanning])
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped



@dataclass
class Clustering:
    """Outcome for the nodes that were assigned to another node's cluster."""

    member: np.ndarray  # nodes removed as near duplicates
    representative: np.ndarray  # the node each was verified against (always kept)
    jaccard: np.ndarray  # the similarity that admitted it (verified or estimated, see `verify`)
    chain_splits: int = 0
    rounds: int = 0


def greedy_clusters(
    node_count: int,
    left: np.ndarray,
    right: np.ndarray,
    priority: np.ndarray,
    similarity,
    threshold: float,
    protected: np.ndarray,
) -> Clustering:
    """Cluster the nodes joined by `left`–`right` edges (already above threshold) with a chain guard.

    Each round: connected components of the edges among unresolved nodes; the component's best node
    (lowest `priority`) is its representative; every other member whose `similarity(member, rep)` is at
    least `threshold` joins it. Members that fail (the far end of a chain) stay unresolved and are
    clustered again among themselves next round. `protected` nodes (from a saved index) are never
    removed: they can only be representatives. Every round resolves at least each representative, so
    this ends."""
    active = np.zeros(node_count, dtype=bool)
    active[left] = True
    active[right] = True
    members, reps, scores = [], [], []
    splits = 0
    rounds = 0
    while True:
        keep_edge = active[left] & active[right] & ~(protected[left] & protected[right])
        edge_left, edge_right = left[keep_edge], right[keep_edge]
        if len(edge_left) == 0:
            break
        rounds += 1
        labels = connected_components(node_count, edge_left, edge_right)
        nodes = sorted_unique(np.concatenate([edge_left, edge_right]))
        node_labels = labels[nodes]
        order = np.lexsort((priority[nodes], node_labels))
        nodes, node_labels = nodes[order], node_labels[order]
        first = np.r_[True, node_labels[1:] != node_labels[:-1]]
        # Each node's representative: the first node of its label's run.
        group_start = np.flatnonzero(first)
        group_index = np.cumsum(first) - 1
        rep = nodes[group_start][group_index]
        candidates = (nodes != rep) & ~protected[nodes]
        member_nodes, member_reps = nodes[candidates], rep[candidates]
        sims = similarity(member_nodes, member_reps)
        passed = sims >= threshold
        members.append(member_nodes[passed])
        reps.append(member_reps[passed])
        scores.append(sims[passed])
        splits += int((~passed).sum())
        active[nodes[first]] = False  # representatives are final
        active[member_nodes[passed]] = False
    if members:
        member = np.concatenate(members)
        representative = np.concatenate(reps)
        jaccard = np.concatenate(scores)
    else:
        member = representative = np.empty(0, dtype=np.int64)
        jaccard = np.empty(0, dtype=np.float64)
    return Clustering(member=member, representative=representative, jaccard=jaccard, chain_splits=splits, rounds=rounds)



def component_leaders(
    node_count: int, left: np.ndarray, right: np.ndarray, priority: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(nodes, leader) for every node on an edge: the leader is the best-priority (lowest) node of the
    node's connected component. The greedy keep never removes a component's best node (it is the first
    representative), so the leader is the component's kept row with the highest keep priority."""
    if len(left) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    labels = connected_components(node_count, left, right)
    nodes = sorted_unique(np.concatenate([left, right]).astype(np.int64))
    node_labels = labels[nodes]
    order = np.lexsort((priority[nodes], node_labels))
    ordered_nodes, ordered_labels = nodes[order], node_labels[order]
    first = np.r_[True, ordered_labels[1:] != ordered_labels[:-1]]
    leader_of_run = ordered_nodes[first][np.cumsum(first) - 1]
    return ordered_nodes, leader_of_run
