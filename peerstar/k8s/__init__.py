"""Kubernetes deployment of a peerstar cluster: swarm key, bootstrap identity, manifests.

Owns the package's public names; see `keys` (swarm key and libp2p identity), `kubo`
(the kubo config edit run by the init container) and `manifests` (the objects).
"""

from peerstar.k8s.keys import (
    Identity,
    IdentityError,
    generate_swarm_key,
    parse_swarm_key,
    peer_id_from_public_key,
)
from peerstar.k8s.kubo import bootstrap_multiaddr, configure_kubo, configure_repo
from peerstar.k8s.manifests import (
    Options,
    bootstrap_secret,
    containerd_config,
    render_manifests,
    to_yaml,
)

__all__ = [
    "Identity",
    "IdentityError",
    "Options",
    "bootstrap_multiaddr",
    "bootstrap_secret",
    "configure_kubo",
    "configure_repo",
    "containerd_config",
    "generate_swarm_key",
    "render_manifests",
    "parse_swarm_key",
    "peer_id_from_public_key",
    "to_yaml",
]
